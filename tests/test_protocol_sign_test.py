"""The sign test on a tiny model: at a small write the exact first-order change predicts every sign and the
measured change equals a plain hooked run; the paper's closed form is the formula it names."""

import json

import pytest
import torch
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair

from hooked_recurrent.edits import add_to_writes
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.install import target_direction
from writesae.protocols.sign_test import SignTestConfig, run_sign_test


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_small_writes_follow_the_exact_first_order_and_the_closed_form_is_eq4(arch, tmp_path):
    model, _ = tiny_pair(arch, dtype=torch.float64)
    layer, head = model.cfg.recurrent_layers[1], 2
    tokens = random_tokens(2, 16, seed=9)
    config = SignTestConfig(multiple=1e-3, horizon=2, positions_per_prompt=3, targets_per_position=2)
    result = run_sign_test(model, tokens, layer, head, config=config, out_dir=tmp_path, verbose=False)
    records = result.records
    assert len(records) == 2 * 3 * 2 and all(100 <= r.target_rank < 1000 for r in records)
    for r in records:
        assert abs(r.measured) > 0
        assert r.measured == pytest.approx(r.predicted["exact"], rel=2e-2)  # first order at a small write
    assert result.summary["headline"]["exact_first_order_sign_agreement"] == 1.0

    # One record by hand: the measured change is the plain hooked run's, the closed form is Eq. 4's.
    r = records[0]
    cell = Cell(layer, head)
    trace = trace_cell(model, tokens[r.prompt : r.prompt + 1], cell)
    key = torch.nn.functional.normalize(trace.key[0, r.position], dim=0)
    norm = float(trace.key[0, r.position].norm() * trace.value[0, r.position].norm() / trace.strength[0, r.position])
    delta = 1e-3 * norm * torch.outer(key, target_direction(model, cell, r.target).double())
    hooks = [(cell.write_hook(model), add_to_writes({r.position: delta}))]
    edited = model.run_with_hooks(tokens[r.prompt : r.prompt + 1], fwd_hooks=hooks)[0, r.reader, r.target]
    assert r.measured == pytest.approx(
        float(edited - model(tokens[r.prompt : r.prompt + 1])[0, r.reader, r.target]), rel=1e-6
    )
    gate = float(trace.log_decay[0, r.position + 1 : r.reader + 1].sum().exp())
    out_proj = model.mixer(layer).head_output_weight(head).double()
    readout = float((out_proj.T @ model.W_U[:, r.target].double()).norm())
    closed_form = gate * float(delta.norm()) * float(key @ trace.query[0, r.reader]) * readout
    assert r.predicted["out_proj"] == pytest.approx(closed_form, rel=1e-5)
    assert json.loads((tmp_path / "summary.json").read_text())["headline"]["n"] == len(records)


def test_bad_settings_are_refused():
    model, _ = tiny_pair("tiny-random:mamba2")
    with pytest.raises(ValueError, match="not a recurrent head"):
        run_sign_test(model, random_tokens(1, 8), 0, 99, verbose=False)
    with pytest.raises(ValueError, match="target_ranks"):
        SignTestConfig(target_ranks=(5, 5))
