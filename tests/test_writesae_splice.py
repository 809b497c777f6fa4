"""Splicing per-head WriteSAEs into the hooked model, SAELens-style."""

import pytest
import torch

import writesae  # noqa: F401  registers the architecture
from families import FAMILY_PRESETS
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteSAEConfig

def make_sae(model, hook, head, layer=None, **meta):
    layer = model.cfg.recurrent_layers[1] if layer is None else layer
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=64, k=4)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, hook)
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = meta.get("model_name", model.cfg.model_name)
    return WriteSAE(cfg, seed=0)


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def model(request):
    return tiny_pair(request.param)[0]


@pytest.mark.parametrize("hook", ["hook_state", "hook_write"])
@torch.no_grad()
def test_error_term_leaves_logits_unchanged_until_a_feature_is_edited(model, hook):
    tokens = random_tokens(2, 40, seed=1)
    sae = make_sae(model, hook, head=2)
    plain = model(tokens)
    assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), plain)
    acts_name = model.sae_hook_name(sae)
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    assert torch.equal(logits, model.run_with_cache(tokens)[0])  # caching patterns runs eager attention
    acts = cache[acts_name]
    assert acts.shape == (2, 40, 64) and int((acts > 0).sum(-1).max()) <= 4
    # The SAE sees its head's slice only: its code equals encoding that slice directly.
    _, states = model.run_with_cache(tokens, names_filter=[model.cfg.hook_name(model.cfg.recurrent_layers[1], hook)])
    torch.testing.assert_close(acts, sae.encode(states[model.cfg.hook_name(model.cfg.recurrent_layers[1], hook)][:, :, 2]))

    feature = int(acts[0, 20].argmax())

    def boost(a, hook):
        a[:, 20, feature] += 5.0

    with model.saes([sae], use_error_term=True):
        edited = model.run_with_hooks(tokens, fwd_hooks=[(acts_name, boost)])
    assert torch.allclose(edited[:, :20], plain[:, :20], atol=1e-5)
    assert (edited[:, 20:] - plain[:, 20:]).abs().max() > 1e-4
    assert not model.acts_to_saes and acts_name not in model.hook_dict  # gone after the block


@torch.no_grad()
def test_without_error_term_the_reconstruction_replaces_the_state(model):
    tokens = random_tokens(1, 24, seed=2)
    sae = make_sae(model, "hook_state", head=1)
    layer = model.cfg.recurrent_layers[1]
    _, plain = model.run_with_cache(tokens, names_filter=[model.cfg.hook_name(layer, "hook_recurrence_out")])
    model.add_sae(sae, use_error_term=False)
    try:
        output = model.sae_hook_name(sae, "hook_sae_output")
        _, spliced = model.run_with_cache(tokens, names_filter=[output, model.cfg.hook_name(layer, "hook_recurrence_out")])
    finally:
        model.reset_saes()
    # The read at each position is that of the reconstructed state.
    recon = spliced[output]
    reads = spliced[model.cfg.hook_name(layer, "hook_recurrence_out")][:, :, 1]
    _, queries = model.run_with_cache(tokens, names_filter=[model.cfg.hook_name(layer, "hook_read_query")])
    q = queries[model.cfg.hook_name(layer, "hook_read_query")][:, :, 1]
    torch.testing.assert_close(reads, torch.einsum("bpkv,bpk->bpv", recon, q), rtol=1e-4, atol=1e-5)
    other = plain[model.cfg.hook_name(layer, "hook_recurrence_out")][:, :, 0]
    torch.testing.assert_close(spliced[model.cfg.hook_name(layer, "hook_recurrence_out")][:, :, 0], other)


def test_mismatched_saes_say_what_does_not_fit(model, caplog):
    good = make_sae(model, "hook_state", head=0)
    with pytest.raises(ValueError, match="head 99"):
        model.add_sae(make_sae(model, "hook_state", head=99))
    with pytest.raises(ValueError, match="no head axis"):
        model.add_sae(make_sae(model, "hook_out", head=1))
    with pytest.raises(ValueError, match="trained on 'another-model'"):
        model.add_sae(make_sae(model, "hook_state", head=0, model_name="another-model"))
    wrong = WriteSAE(WriteSAEConfig.build(d_k=model.cfg.d_k + 1, d_v=model.cfg.d_v, d_sae=8, k=2))
    wrong.cfg.metadata.hook_name, wrong.cfg.metadata.hook_head_index = good.cfg.metadata.hook_name, 0
    with pytest.raises(ValueError, match="d_k x d_v"):
        model.add_sae(wrong)
    wrong.cfg.metadata.hook_name = good.cfg.metadata.hook_name.replace("hook_state", "hook_stat")
    model.add_sae(wrong)  # skipped with a warning naming the closest hook points, as in SAELens
    assert "No hook found" in caplog.text and good.cfg.metadata.hook_name in caplog.text
    assert not model.acts_to_saes
    model.add_sae(good)
    model.reset_hooks()  # ordinary hook resets keep spliced SAEs
    assert model.acts_to_saes
    model.reset_saes()
    assert not model.acts_to_saes and not any(h.has_fwd_hooks() for h in model.hook_dict.values())


@torch.no_grad()
def test_a_write_sae_without_a_head_acts_on_every_head(model):
    """SAELens applies an SAE to the whole activation of its hook point: here, each head's state."""
    tokens = random_tokens(1, 12, seed=3)
    sae = make_sae(model, "hook_state", head=None)
    name = sae.cfg.metadata.hook_name
    _, states = model.run_with_cache(tokens, names_filter=name)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=name + ".hook_sae_acts_post")
    torch.testing.assert_close(cache[name + ".hook_sae_acts_post"], sae.encode(states[name]))
