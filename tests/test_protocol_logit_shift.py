"""The logit shift: the exact path predicts real cache edits; the ladder collapses where the paper is exact."""

import json

import numpy as np
import pytest
import torch
from transformers import Mamba2ForCausalLM

import writesae  # noqa: F401
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.families.mamba2 import Mamba2
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.logit_shift import PATHS, LogitShiftConfig, r_squared, run_logit_shift


def sae_for(model, layer, head):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=8, k=2)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=1)


def test_r_squared_by_hand():
    m = np.array([1.0, 2.0, 3.0])
    assert r_squared(m, m) == 1.0
    assert r_squared(m, np.full(3, 2.0)) == 0.0  # predicting the mean explains nothing
    assert r_squared(m, np.array([1.0, 2.0, 4.0])) == pytest.approx(1 - 1 / 2)


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_the_exact_path_predicts_real_cache_edits(arch, tmp_path):
    """Small eps: the exact first-order shift explains the real edits (R^2 >= 0.99 in every cell)."""
    model, _ = tiny_pair(arch)
    sae = sae_for(model, model.cfg.recurrent_layers[1], 1)
    tokens = random_tokens(3, 20, seed=3)
    config = LogitShiftConfig(epsilons=(1e-3, 3e-3), eps_scale="state_norm", horizons=(1, 3, 6), positions_per_prompt=2)
    result = run_logit_shift(model, sae, tokens, atoms=[0, 3, 5], config=config, out_dir=tmp_path, verbose=False)
    cells = [json.loads(line) for line in (tmp_path / "atoms.jsonl").read_text().splitlines()]
    assert len(cells) == result.summary["n_cells"] == 6
    for cell in cells:
        assert cell["n"] == 3 * 2 * 3 and cell["r2"]["exact"] >= 0.99
    assert result.summary["median_r2"]["exact"] >= 0.99
    assert {row["path"] for row in result.summary["ladder"]} == set(PATHS)
    assert {"settings.json", "summary.json", "report.md", "r2_scatter.png", "linearity.png"} <= {p.name for p in tmp_path.iterdir()}


def test_the_ladder_collapses_where_the_derivation_is_exact():
    """One Mamba-2 layer: no erase (erase == out_proj), no later layer or attention (same_position ==
    exact), and the gate product is the whole propagation (local == same_position)."""
    torch.manual_seed(0)
    model = HookedRecurrentModel(Mamba2ForCausalLM(Mamba2.tiny_config(num_hidden_layers=1)).eval(), model_name="one-layer")
    sae = sae_for(model, 0, 2)
    tokens = random_tokens(2, 24, seed=2)
    config = LogitShiftConfig(epsilons=(1e-3, 1.0), horizons=(1, 4), positions_per_prompt=2)
    result = run_logit_shift(model, sae, tokens, atoms=[0, 3], config=config, verbose=False)
    for r in result.records:
        p = r.predicted
        scale = max(abs(p["exact"]), 1e-6)
        assert p["erase"] == pytest.approx(p["out_proj"], abs=1e-4 * scale)
        assert p["local"] == pytest.approx(p["exact"], abs=1e-4 * scale)
        assert p["same_position"] == pytest.approx(p["exact"], abs=1e-4 * scale)
    # The paper's per-triple fit is a linearity check: a slope per triple across eps. Where the
    # shift is linear in eps it fits whatever the formula; at eps = 1 the exact path no longer does.
    linearity = {row["eps"]: row["median_r2_exact"] for row in result.summary["linearity"]}
    assert linearity[1e-3] > 0.999 and linearity[1.0] < linearity[1e-3]
