"""The substitution test on constructed cases, and end to end on both architectures."""

import json

import pytest
import torch

import writesae  # noqa: F401
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.substitution import Firing, SubstitutionConfig, kl_divergence, run_substitution



def sae_for(model, layer, head, hook="hook_write", d_sae=4, k=1):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, hook)
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=0)


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_atom_equal_to_the_native_write_costs_nothing_and_an_orthogonal_one_does(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer, head, t = model.cfg.recurrent_layers[1], 2, 20
    tokens = random_tokens(1, 32, seed=3)
    trace = trace_cell(model, tokens, Cell(layer, head))
    key, value = trace.key[0, t], trace.value[0, t]
    sae = sae_for(model, layer, head)
    unit = torch.nn.functional.normalize
    sae.W_dec_key.data[0, 0], sae.W_dec_value.data[0, 0] = unit(key, dim=0), unit(value, dim=0)
    other_key = unit(torch.randn(model.cfg.d_k, generator=torch.Generator().manual_seed(0)), dim=0)
    other_key = unit(other_key - (other_key @ unit(key, dim=0)) * unit(key, dim=0), dim=0)
    sae.W_dec_key.data[1, 0], sae.W_dec_value.data[1, 0] = other_key, unit(value, dim=0)

    config = SubstitutionConfig(scale="matched_norm", substitute="firing")
    firings = [Firing(0, t, 0, 1.0), Firing(0, t, 1, 1.0)]
    result = run_substitution(model, sae, tokens, config=config, firings=firings, out_dir=tmp_path, verbose=False)
    same, orthogonal = result.records
    assert same["cos_substituted_to_write"] == pytest.approx(1.0, abs=1e-5)
    assert same["kl_atom"] < 1e-9 < same["kl_delete"]
    assert same["win"]
    assert orthogonal["cos_substituted_to_write"] == pytest.approx(0.0, abs=1e-5)
    assert orthogonal["kl_atom"] > max(1e-10, 100 * same["kl_atom"])
    # The run directory holds what the function returned.
    assert json.loads((tmp_path / "summary.json").read_text())["n_firings"] == 2
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "report.md").exists() and (tmp_path / "kl_histogram.png").exists()


def test_kl_divergence_by_hand():
    p, q = torch.tensor([0.0, 0.0]), torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert float(kl_divergence(p, q)) == pytest.approx(float(expected))


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_discovered_firings_end_to_end(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer = model.cfg.recurrent_layers[0]
    sae = sae_for(model, layer, 1, hook="hook_state", d_sae=16, k=2)
    tokens = random_tokens(3, 24, seed=5)
    config = SubstitutionConfig(max_firings_per_atom=3, min_firings=2, kl_offsets=(0, 1), n_bootstrap=200)
    result = run_substitution(model, sae, tokens, config=config, out_dir=tmp_path, verbose=False)
    records, summary = result.records, result.summary
    assert summary["n_firings"] == len(records) > 0
    assert max(sum(r["atom"] == a for r in records) for a in {r["atom"] for r in records}) <= 3
    assert summary["win_rate"] == pytest.approx(sum(r["win"] for r in records) / len(records))
    low, high = summary["win_rate_wilson95"]
    assert low <= summary["win_rate"] <= high
    assert all(r["position"] < 23 for r in records)  # a KL offset of 1 needs a next position
    assert summary["cell"]["sae_reads"] == "state"
