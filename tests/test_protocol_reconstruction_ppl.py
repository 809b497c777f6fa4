"""Reconstruction perplexity on constructed SAEs: an exact one changes nothing, a zero one zeroes the state."""

import json

import pytest
import torch
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair

import writesae  # noqa: F401
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.reconstruction_ppl import (
    ReconstructionPPLConfig,
    run_reconstruction_ppl,
    sae_sets,
)


def state_sae(model, layer, head, d_sae, **kwargs):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=d_sae, **kwargs)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    return WriteSAE(cfg, seed=0)


def svd_sae(model, layer, head, state):
    """Tied matched-filter atoms u_i v_i^T from the SVD of ``state``: the codes are its singular values,
    so this SAE reconstructs ``state`` exactly."""
    u, _, vh = torch.linalg.svd(state.double())
    r = min(state.shape)
    sae = state_sae(model, layer, head, r, variant="bilinear_tied")
    sae.W_dec_key.data[:, 0] = u[:, :r].T.float()
    sae.W_dec_value.data[:, 0] = vh[:r].float()
    return sae


def zero_sae(model, layer, head):
    sae = state_sae(model, layer, head, 2)
    sae.W_dec_key.data.zero_()
    return sae


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_exact_and_zero_saes_against_a_direct_run(arch, tmp_path):
    model, _ = tiny_pair(arch, dtype=torch.float64)
    layer, (h0, h1), p = model.cfg.recurrent_layers[0], (0, 1), 11
    tokens = random_tokens(2, 24, seed=7)
    states = trace_cell(model, tokens, Cell(layer, h0), with_states=True).states
    exact = svd_sae(model, layer, h0, states[0, p])  # exact for sequence 0 only
    assert torch.allclose(exact(states[0, p].float()).double(), states[0, p], atol=1e-5)
    sets = {"svd": [exact], "mix": [exact, zero_sae(model, layer, h1)]}
    config = ReconstructionPPLConfig(position=p, sequences_per_unit=2)
    result = run_reconstruction_ppl(model, sets, tokens, config=config, out_dir=tmp_path, verbose=False)
    first, second = (r.nll for r in result.records)
    assert first["svd/H0"] == pytest.approx(first["base"], rel=1e-5)
    assert abs(second["svd/H0"] - second["base"]) > 1e-4  # another sequence's state is not reconstructed
    for nll in (first, second):
        assert nll["mix/H1"] == pytest.approx(nll["zero/H1"], rel=1e-9)
    assert first["mix/all"] == pytest.approx(first["zero/H1"], rel=1e-5)  # head 0 exact, head 1 zeroed

    # Zeroing the state after p equals a plain hooked run that zeroes it, scored on the tokens after p.
    def zero(states, hook):
        states[:, p - hook.start_position] = 0
        return states

    logits = model.run_with_hooks(tokens, fwd_hooks=[(Cell(layer, h1).state_hook(model), zero)])
    log_p = torch.log_softmax(logits[:, p:-1].double(), dim=-1).gather(-1, tokens[:, p + 1 :, None])
    assert [r.nll["zero/H1"] for r in result.records] == pytest.approx((-log_p.sum((1, 2))).tolist(), rel=1e-7)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pct_change"]["mix/H1"] == pytest.approx(summary["pct_change"]["zero/H1"])
    assert {
        "mix_pct_change_all_heads",
        "svd_pct_change_H0",
        "zeroed_state_pct_change",
    } <= set(summary["headline"])


def test_a_list_of_saes_is_split_by_rank_and_short_sequences_are_refused():
    model, _ = tiny_pair("tiny-random:mamba2")
    layer = model.cfg.recurrent_layers[0]
    saes = [state_sae(model, layer, h, 4, rank=r) for r in (1, 2) for h in (0, 1)]
    assert {k: len(v) for k, v in sae_sets(saes).items()} == {"rank-1": 2, "rank-2": 2}
    with pytest.raises(ValueError, match="longer than position"):
        run_reconstruction_ppl(model, saes, random_tokens(1, 12), verbose=False)
    with pytest.raises(ValueError, match="two SAEs on head 0"):
        run_reconstruction_ppl(model, {"x": saes[:1] * 2}, random_tokens(1, 12), verbose=False)
