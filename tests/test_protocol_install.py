"""Installs write the target with the sign the reading query sees."""

import pytest
import torch

from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.install import InstallConfig, run_install, target_direction


def planted_reader(model, cell, prompt, install_at):
    """A hook making the last prompt position's query read the native key at ``install_at`` negatively."""
    key = trace_cell(model, prompt, cell).key[0, install_at]
    last = prompt.shape[1] - 1

    def plant(queries, hook):
        i = last - hook.start_position
        if 0 <= i < queries.shape[1]:
            row = queries[:, i, cell.head]
            queries[:, i, cell.head] = -torch.nn.functional.normalize(key.to(row), dim=0) * row.norm(dim=-1, keepdim=True)
        return queries

    return cell.hook_name(model, "hook_read_query"), plant


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_the_reading_query_as_key_writes_the_intended_sign(arch, tmp_path):
    model, _ = tiny_pair(arch)
    cell = Cell(model.cfg.recurrent_layers[-1], 1)
    prompt = random_tokens(1, 12, seed=4)
    hook = planted_reader(model, cell, prompt, install_at=10)
    config = InstallConfig(multiples=(0.1, 0.3), window=1, ends_from_last=(1,), new_tokens=3, direction="logprob_gradient",
                           rank_classes=(("mid", 20, 120),), targets_per_class=12)  # fmt: skip
    with model.hooks(fwd_hooks=[hook]):
        native = run_install(model, prompt, cell.layer, cell.head, config=InstallConfig(**{**vars(config), "key": "native"}), verbose=False)
        reader = run_install(model, prompt, cell.layer, cell.head, config=config, out_dir=tmp_path, verbose=False)
    for result in (native, reader):
        assert len(result.records) == 12 * 2 and all(20 <= r.rank_before < 120 for r in result.records)
    assert all(r.key_query_cosine == pytest.approx(-1.0, abs=1e-5) for r in native.records)  # the planted reader
    assert all(r.key_query_cosine == pytest.approx(1.0, abs=1e-5) for r in reader.records)
    improved = {name: sum(r.rank_after < r.rank_before for r in res.records) / len(res.records)
                for name, res in (("native", native), ("reader", reader))}  # fmt: skip
    assert improved["reader"] >= 0.9 and improved["native"] <= 0.1  # the native key installs the opposite sign
    top = reader.summary["largest_multiple"]
    assert top["multiple"] == 0.3 and top["median_logp_lift"] > 0 > native.summary["largest_multiple"]["median_logp_lift"]
    assert {"settings.json", "records.jsonl", "summary.json", "report.md", "sweep.png"} <= {p.name for p in tmp_path.iterdir()}


def test_target_direction_points_the_head_output_at_the_token():
    model, _ = tiny_pair("tiny-random:qwen3.5")
    cell = Cell(1, 2)
    direction = target_direction(model, cell, 42)
    out_proj = model.mixer(1).head_output_weight(2).detach()
    scores = (out_proj @ direction) @ model.W_U.detach()  # logit change per unit read along the direction
    assert float(direction.norm()) == pytest.approx(1.0)
    assert scores[42] > 0 and scores[42] >= torch.quantile(scores, 0.9)


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_readout_direction_is_the_unembedding_pulled_back_through_the_layer(arch):
    """``direction="readout"`` (forward-mode, one tangent per value axis) against reverse-mode autograd of
    ``W_U[T] . layer_output`` with respect to the head's read at the reading position."""
    from writesae.protocols.install import Install
    from writesae.protocols.walk import SequenceWalk

    model, _ = tiny_pair(arch)
    cell = Cell(model.cfg.recurrent_layers[-1], 1)
    prompt, targets = random_tokens(1, 10, seed=7), [5, 77, 140]
    install = Install(model, prompt, cell.layer, cell.head, targets=targets, config=InstallConfig(direction="readout"))
    directions = install._directions(SequenceWalk(model, prompt), prompt, model(prompt)[0, -1].detach(), targets)

    last, seen = prompt.shape[1] - 1, {}
    read = torch.zeros(model.cfg.d_v, requires_grad=True)

    def perturb(o, hook):
        o = o.clone()
        o[:, last, cell.head] = o[:, last, cell.head] + read
        return o

    def keep(out, hook):
        seen["out"] = out[0, last]

    hooks = [(cell.hook_name(model, "hook_recurrence_out"), perturb), (f"blocks.{cell.layer}.hook_attn_out", keep)]
    for token in targets:
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            model(prompt)
            (gradient,) = torch.autograd.grad(seen["out"] @ model.W_U[:, token], read)
        expected = torch.nn.functional.normalize(gradient.detach(), dim=0)
        assert torch.allclose(directions[token], expected, atol=1e-4), (token, directions[token], expected)
        # The gated norm matters: the paper's W_O^T W_U[T] is a different direction.
        assert float(directions[token] @ target_direction(model, cell, token)) < 0.9999
