"""The closed-form logit shift: exact where the derivation is exact, reported per (atom, eps) cell."""

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
from writesae.protocols.logit_shift import LogitShiftConfig, r_squared, run_logit_shift


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


def test_exact_on_a_single_mamba2_layer():
    """No erase term, one layer, the exact output path: the prediction is the first-order shift."""
    torch.manual_seed(0)
    model = HookedRecurrentModel(Mamba2ForCausalLM(Mamba2.tiny_config(num_hidden_layers=1)).eval(), model_name="one-layer")
    sae = sae_for(model, 0, 2)
    tokens = random_tokens(4, 30, seed=2)
    config = LogitShiftConfig(epsilons=(1e-3, 2e-3), horizons=(1, 3, 6), path="jacobian", positions_per_prompt=2)
    result = run_logit_shift(model, sae, tokens, atoms=[0, 3, 5], config=config, verbose=False)
    assert result.summary["n_cells"] == 6
    for cell in result.summary["cells"]:
        assert cell["r2_zero_parameter"] > 0.999
        assert cell["fitted_gain"] == pytest.approx(1.0, abs=0.02)
    measured = np.array([r["measured"] for r in result.records])
    predicted = np.array([r["predicted"] for r in result.records])
    assert np.abs(measured - predicted).max() < 0.02 * np.abs(measured).max()


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_paper_path_runs_and_writes_its_run_directory(arch, tmp_path):
    model, _ = tiny_pair(arch)
    sae = sae_for(model, model.cfg.recurrent_layers[1], 1)
    tokens = random_tokens(3, 24, seed=3)
    config = LogitShiftConfig(epsilons=(0.3, 1.0), horizons=(1, 2), n_atoms=2)
    result = run_logit_shift(model, sae, tokens, config=config, out_dir=tmp_path, verbose=False)
    assert result.summary["n_cells"] == 2 * len(result.summary["atoms"])
    assert all(r["gate_product"] <= 1.0 + 1e-6 for r in result.records)
    assert {p.name for p in tmp_path.iterdir()} >= {"records.jsonl", "summary.json", "report.md", "r2_scatter.png"}
