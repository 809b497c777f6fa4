"""All heads of a layer (Table 12): two heads run together equal two single-head substitution runs."""

import numpy as np
import pytest

import writesae  # noqa: F401
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.all_heads import AllHeadsConfig, run_all_heads
from writesae.protocols.substitution import SubstitutionConfig, run_substitution
from writesae.protocols.substitution_set import untag


def head_sae(model, layer, head, seed):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=8, k=2)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=seed)


def test_two_heads_together_equal_two_single_head_runs(tmp_path):
    model, _ = tiny_pair("tiny-random:mamba2")
    layer = model.cfg.recurrent_layers[0]
    saes = {3: head_sae(model, layer, 3, seed=1), 0: head_sae(model, layer, 0, seed=2)}
    tokens = random_tokens(2, 10, seed=7)
    substitution = SubstitutionConfig(max_firings_per_atom=1, n_bootstrap=20, n_permutations=20)
    config = AllHeadsConfig(substitution=substitution, thresholds=(0.0, 0.5, 1.0))
    result = run_all_heads(model, saes, tokens, config=config, out_dir=tmp_path, verbose=False)
    rates = {}
    for head, sae in saes.items():
        alone = run_substitution(model, sae, tokens, config=substitution, verbose=False)
        together = [untag(r) for r in result.records if r.sae == f"H{head}"]
        assert len(together) == len(alone.records) > 2
        assert together == alone.records
        rates[head] = alone.summary["headline"]["win_rate"]
    h = result.summary["headline"]
    assert [r["head"] for r in result.summary["heads"]] == [0, 3]
    assert {r["head"]: r["win_rate"] for r in result.summary["heads"]} == rates
    assert h["mean_win_rate"] == pytest.approx(np.mean(list(rates.values())))
    assert h["sd_win_rate"] == pytest.approx(np.std(list(rates.values())))  # population sd (the paper's 2.63)
    assert h["n_heads_above_0"] == sum(r > 0 for r in rates.values())
    assert h["n_heads_above_1"] == 0
    assert (tmp_path / "heads.jsonl").is_file() and (tmp_path / "win_rate_by_head.png").is_file()


def test_heads_of_different_layers_are_refused():
    model, _ = tiny_pair("tiny-random:mamba2")
    a, b = model.cfg.recurrent_layers[:2]
    with pytest.raises(ValueError, match="one layer"):
        run_all_heads(model, [head_sae(model, a, 0, 0), head_sae(model, b, 1, 0)], random_tokens(1, 4), verbose=False)
