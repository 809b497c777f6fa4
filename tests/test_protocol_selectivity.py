"""Selectivity: top-K overlap on hand-made changes, a constructed pair that moves the logits identically, end to end."""

import pytest
import torch
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair

import writesae  # noqa: F401
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.selectivity import (
    PAIRS,
    PAPER_REFERENCE,
    SelectivityConfig,
    orthogonal_rank1,
    perturbation_logit_changes,
    run_selectivity,
    topk_selectivity,
)
from writesae.protocols.walk import SequenceWalk

unit = torch.nn.functional.normalize


def test_topk_selectivity_counts_shared_top_tokens():
    a = torch.tensor([9.0, 8, 7, 6, 0, 0])
    b = torch.tensor([9.0, 0, 7, 0, 8, 6])
    assert topk_selectivity(a, b, [1, 2, 4]) == [0.0, 0.5, 0.5]  # {0} | {0,1} vs {0,4} | {0,1,2,3} vs {0,2,4,5}
    assert topk_selectivity(a, -a, [2], rank_by="absolute") == [0.0]  # a change and its negation: same tokens
    assert topk_selectivity(a, -a, [2], rank_by="increase") == [1.0]


def test_orthogonal_control_is_orthogonal_to_every_factor():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 7, generator=g), torch.randn(2, 5, generator=g)
    m = orthogonal_rank1(keys, values, g)
    assert float(m.norm()) == pytest.approx(1.0) and torch.linalg.matrix_rank(m) == 1
    assert (keys @ m).abs().max() < 1e-5 and (m @ values.T).abs().max() < 1e-5


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_same_value_factor_and_query_overlap_moves_the_logits_identically(arch):
    """A state perturbation v w^T changes the read at t by (q_t . v) w: two perturbations with the same
    w and the same q_t . v give the same logits (selectivity 0 at every K); another w does not."""
    model, _ = tiny_pair(arch)
    cell, t = Cell(model.cfg.recurrent_layers[-1], 1), 12
    tokens = random_tokens(1, 16, seed=5)
    q = trace_cell(model, tokens, cell).query[0, t].double()
    g = torch.Generator().manual_seed(3)
    v1 = unit(torch.randn(model.cfg.d_k, generator=g, dtype=torch.float64), dim=0)
    p = unit(torch.randn(model.cfg.d_k, generator=g, dtype=torch.float64), dim=0)
    p = unit(p - (p @ unit(q, dim=0)) * unit(q, dim=0), dim=0)  # a direction orthogonal to the query
    v2 = v1 - 2 * (v1 @ p) * p  # reflected across q's side: same norm, same q . v, another key
    w, w_other = (unit(torch.randn(model.cfg.d_v, generator=g, dtype=torch.float64), dim=0) for _ in range(2))
    assert float((v1 - v2).norm()) > 0.1 and float(q @ v1) == pytest.approx(float(q @ v2))
    scale = 3.0
    perturbations = {name: (scale * torch.outer(v, x)).float() for name, (v, x) in
                     {"a": (v1, w), "b": (v2, w), "c": (v1, w_other)}.items()}  # fmt: skip
    changes = perturbation_logit_changes(SequenceWalk(model, tokens), cell, 0, t, perturbations)
    assert float(changes["a"].abs().max()) > 1e-3
    assert torch.allclose(changes["a"], changes["b"], atol=1e-5 * float(changes["a"].abs().max()))
    ks = (1, 5, 10, 20)
    assert topk_selectivity(changes["a"], changes["b"], ks) == [0.0] * len(ks)
    assert max(topk_selectivity(changes["a"], changes["c"], ks)) > 0.3


def sae_for(model, layer, head, d_sae=6, k=2):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=0)


def test_end_to_end_reports_the_random_floor_beside_the_atoms(tmp_path):
    model, _ = tiny_pair("tiny-random:qwen3.5")
    sae = sae_for(model, model.cfg.recurrent_layers[-1], 2)
    tokens = random_tokens(2, 16, seed=1)
    config = SelectivityConfig(ks=(1, 5, 10), eps_scale="state_norm", epsilon=0.5, n_atoms=2, max_firings_per_atom=2)
    result = run_selectivity(model, sae, tokens, config=config, out_dir=tmp_path, verbose=False)
    assert 0 < len(result.records) <= 4 and {r.atom for r in result.records} <= set(range(6))
    for r in result.records:
        assert set(r.selectivity) == set(PAIRS)
        assert all(0 <= s <= 1 and len(v) == 3 for v in r.selectivity.values() for s in v)
        assert all(c > 0 for c in r.change_norm.values())
    h = result.summary["headline"]
    assert {"atom_vs_random", "atom_vs_orthogonal", "random_vs_random"} <= set(h)
    assert h["n_firings"] == len(result.records)
    mean_rr = sum(sum(r.selectivity["random|random"]) / 3 for r in result.records) / len(result.records)
    assert h["random_vs_random"] == pytest.approx(mean_rr)
    assert result.summary["paper_reference"] == PAPER_REFERENCE
    assert {"report.md", "selectivity.png", "atoms.jsonl"} <= {p.name for p in tmp_path.iterdir()}
