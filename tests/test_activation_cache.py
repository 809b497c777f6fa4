"""TransformerLens' ActivationCache methods on hybrid recurrent models: they add up, or say why not.

References: the cached hook points themselves (a decomposition must sum to the residual stream it
decomposes, each mixer's heads to its output), the HF norm modules, and the unembedding matrix.
"""

import pytest
import torch
from transformer_lens.utilities import Slice

from families import FAMILY_PRESETS
from helpers import random_tokens, tiny_pair


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def run(request):
    model = tiny_pair(request.param)[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(random_tokens(2, 7, seed=12))
    return model, cache


def final_resid(model, cache):
    return cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]


def additive(model):
    """Whether every block adds its sublayers' outputs to the residual stream (not MiniMax's)."""
    return all(block.additive_residual for block in model.blocks)


def per_head(model):
    """Whether every mixer computes its heads here (not attention run as the HF module is) and adds
    them to the residual stream as they are (no post-norm)."""
    return all(
        hasattr(model.mixer(l), "head_results") and not model.blocks[l].normed_outputs for l in range(model.cfg.n_layers)
    )


def neurons(model):
    """Whether every block has a gated MLP whose output is added as it is."""
    return all(hasattr(getattr(block, "mlp", None), "W_out") and not block.normed_outputs for block in model.blocks)


def test_residual_decompositions_add_up_to_the_residual_stream(run):
    model, cache = run
    total = final_resid(model, cache)
    if not additive(model):
        with pytest.raises(ValueError, match="not a sum of its components' outputs"):
            cache.decompose_resid(layer=-1)
        return
    parts, labels = cache.decompose_resid(layer=-1, return_labels=True)
    torch.testing.assert_close(parts.sum(0), total, rtol=1e-4, atol=1e-4)
    per_block = 1 if model.cfg.attn_only else 2
    assert len(labels) == 1 + per_block * model.cfg.n_layers and labels[0] == "embed"
    mixers = cache.decompose_resid(layer=-1, mode="attn", incl_embeds=False)
    for l, block in enumerate(model.blocks):  # a pre-norm block's mixer, attention or recurrent, is its attn_out
        if not block.normed_outputs:
            torch.testing.assert_close(mixers[l], cache[f"blocks.{l}.{model.cfg.mixer_name(l)}.hook_out"])
    if not per_head(model):
        with pytest.raises(ValueError, match="no per-head results"):
            cache.get_full_resid_decomposition(layer=-1, expand_neurons=False)
        return
    full = cache.get_full_resid_decomposition(layer=-1, expand_neurons=neurons(model))
    torch.testing.assert_close(full.sum(0), total, rtol=1e-4, atol=1e-4)


def test_every_mixers_heads_sum_to_its_output(run):
    model, cache = run
    if not per_head(model):
        with pytest.raises(ValueError, match="no per-head results"):
            cache.stack_head_results(layer=-1)
        return
    stack, labels = cache.stack_head_results(layer=-1, incl_remainder=True, return_labels=True)
    start = 0
    for l in range(model.cfg.n_layers):
        out = cache[f"blocks.{l}.{model.cfg.mixer_name(l)}.hook_out"]
        n = sum(label.startswith(f"L{l}H") for label in labels)
        assert n == (model.cfg.n_attn_heads if model.cfg.layer_types[l] == "attention" else model.mixer(l).n_heads)
        torch.testing.assert_close(stack[start : start + n].sum(0), out, rtol=1e-4, atol=1e-5)
        start += n
    assert labels[-1] == "remainder"
    torch.testing.assert_close(stack.sum(0), final_resid(model, cache))
    key = f"blocks.0.{model.cfg.mixer_name(0)}.hook_result"
    cache.cache_dict[key][0, 0, 0, 0] = float("inf")
    cache.compute_head_results()  # computed once: the marked value stays
    assert cache.cache_dict[key][0, 0, 0, 0] == float("inf")
    cache.cache_dict.pop(key)


def test_apply_ln_to_stack_divides_by_the_norms_own_scale(run):
    model, cache = run
    first = next(l for l, block in enumerate(model.blocks) if hasattr(block, "ln1"))  # a pre-norm block
    for layer, norm in ((first, f"blocks.{first}.ln1"), (model.cfg.n_layers, "ln_final")):
        x = cache[f"blocks.{layer - 1}.hook_resid_post" if layer else "blocks.0.hook_resid_pre"]
        scaled = cache.apply_ln_to_stack(x[None], layer=layer)[0]
        gain = cache[f"{norm}.hook_normalized"] / scaled  # the norm's weight: the same at every position
        torch.testing.assert_close(gain, gain[:1, :1].expand_as(gain), rtol=1e-4, atol=1e-5)
    recomputed = cache.accumulated_resid(layer=-1, apply_ln=True)  # ln_final applied to each entry
    torch.testing.assert_close(recomputed[-1], cache["ln_final.hook_normalized"])
    sliced = cache.accumulated_resid(layer=-1, pos_slice=-1, apply_ln=True)
    torch.testing.assert_close(sliced, recomputed[:, :, -1])


@torch.no_grad()
def test_an_edit_of_hook_scale_rescales_the_norm_as_in_transformerlens(run):
    model, cache = run
    tokens = random_tokens(2, 7, seed=12)
    with model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda scale, hook: scale * 2)]):
        _, edited = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    torch.testing.assert_close(edited["ln_final.hook_normalized"], cache["ln_final.hook_normalized"] / 2)


def test_logit_attributions_read_the_unembedding(run):
    model, cache = run
    stack = cache.accumulated_resid(layer=-1, pos_slice=-1)
    right, wrong = torch.tensor([5, 9]), torch.tensor([11, 3])
    direction = model.W_U[:, right].T - model.W_U[:, wrong].T  # [batch, d_model]
    expected = (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * direction).sum(-1)
    got = cache.logit_attrs(stack, tokens=right, incorrect_tokens=wrong, pos_slice=-1)
    torch.testing.assert_close(got, expected)
    one = cache.logit_attrs(stack[:, 1], tokens=5, has_batch_dim=False, batch_slice=1, pos_slice=Slice(-1))
    torch.testing.assert_close(one, (cache.apply_ln_to_stack(stack, -1, pos_slice=-1)[:, 1] * model.W_U[:, 5]).sum(-1))


def test_neurons_sum_to_the_mlp_or_the_block_says_it_has_none(run):
    model, cache = run
    if model.cfg.attn_only:
        with pytest.raises(ValueError, match="no MLP, hence no resid_mid"):
            cache.accumulated_resid(incl_mid=True)
        with pytest.raises(ValueError, match="no MLP, hence no resid_mid"):
            cache.apply_ln_to_stack(cache["blocks.0.hook_resid_pre"][None], 1, mlp_input=True)
    if not neurons(model):
        with pytest.raises(ValueError, match="no neuron results"):
            cache.stack_neuron_results(layer=-1)
        return
    for l in range(model.cfg.n_layers):
        torch.testing.assert_close(cache.get_neuron_results(l).sum(-2), cache[f"blocks.{l}.hook_mlp_out"], rtol=1e-4, atol=1e-5)
    stack, labels = cache.stack_neuron_results(2, pos_slice=-1, return_labels=True)
    assert stack.shape[0] == len(labels) == 2 * model.cfg.d_mlp and labels[0] == "L0N0"


def test_recurrent_states_are_read_from_the_cache(run):
    model, cache = run
    assert cache.ssm_layers() == model.cfg.recurrent_layers
    layer = model.cfg.recurrent_layers[-1]
    assert torch.equal(cache.compute_ssm_state(layer), cache[model.cfg.hook_name(layer, "hook_state")])
    assert torch.equal(cache.compute_ssm_state(layer, time_step=3), cache[model.cfg.hook_name(layer, "hook_state")][:, 3])
    with pytest.raises(NotImplementedError, match="hook_write"):
        cache.compute_ssm_effective_attention()
    assert torch.equal(cache["scale", 1, "ln1"], cache["blocks.1.ln1.hook_scale"])  # TransformerLens shorthand
    assert cache["attn_out", -1].shape == final_resid(model, cache).shape
