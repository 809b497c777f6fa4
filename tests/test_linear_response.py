"""The linear response of an edit: against real edits, a hand propagation, and a hand-solved layer."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2ForCausalLM

from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair
from hooked_recurrent import HookedRecurrentModel, RecurrentCache
from hooked_recurrent.families.mamba2 import Mamba2
from hooked_recurrent.linear_response import LOGITS, cache_responses, linear_response, linear_responses



def r_squared(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    return float(1 - ((measured - predicted) ** 2).sum() / ((measured - measured.mean()) ** 2).sum())


def rank2(model, seed):
    g = torch.Generator().manual_seed(seed)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    return (torch.randn(d_k, 2, generator=g, dtype=torch.float64) @ torch.randn(2, d_v, generator=g, dtype=torch.float64)) / 4


@pytest.mark.parametrize("arch", CORE_PRESETS)
@pytest.mark.parametrize("kind", ["state", "write"])
def test_predicts_real_edits_to_first_order(arch, kind):
    """A real edit of size eps moves the logits by eps * response + O(eps^2), at every position."""
    model, _ = tiny_pair(arch, dtype=torch.float64)
    layer, head, t0 = model.cfg.recurrent_layers[0], 1, 9
    tokens = random_tokens(2, 24, seed=1)
    delta = rank2(model, 0)
    if kind == "state":  # one head's hook point
        name, index, head_arg = model.cfg.hook_name(layer, f"heads.{head}.hook_state"), (slice(None), t0), None
    else:  # the all-head hook point, with head=
        name, index, head_arg = model.cfg.hook_name(layer, "hook_write"), (slice(None), t0, head), head
    response = linear_response(model, tokens, name, t0, delta, head=head_arg)
    eps = 1e-4  # float32 parts of the model (norms, softmax) limit how small eps can go

    def add(activation, hook):
        activation[index] += eps * delta
        return activation

    with torch.no_grad():
        shift = (model.run_with_hooks(tokens, fwd_hooks=[(name, add)]) - model(tokens)) / eps
    assert response.shape == shift.shape
    assert torch.equal(response[:, :t0], torch.zeros_like(response[:, :t0]))
    assert response[:, t0:].abs().amax() > 1e-3  # the edit matters
    assert r_squared(shift[:, t0:], response[:, t0:]) > 0.999
    torch.testing.assert_close(response, shift, rtol=0, atol=1e-2 * float(response.abs().max()))


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_cache_edits_and_batches(arch):
    """Edits of a cached state (only later positions read them), several in one pass."""
    model, _ = tiny_pair(arch, dtype=torch.float64)
    layer, head = model.cfg.recurrent_layers[-1], 2
    tokens = random_tokens(1, 20, seed=2)
    cache = RecurrentCache(model, 1)
    with torch.no_grad():
        model(tokens[:, :8], cache=cache)
    deltas = torch.stack([rank2(model, 1), rank2(model, 2), rank2(model, 1) * -3])
    read = model.cfg.hook_name(layer, "hook_recurrence_out")
    responses = cache_responses(model, cache, tokens[:, 8:], layer, deltas, head=head, reads=[read], max_rows=2)
    assert responses[LOGITS].shape == (3, 1, 12, model.cfg.d_vocab)
    assert responses[read].shape == (3, 1, 12, model.cfg.n_heads, model.cfg.d_v)
    # Linear in the edit, whatever the grouping of the passes.
    scale = float(responses[LOGITS].abs().max())
    torch.testing.assert_close(responses[LOGITS][2], -3 * responses[LOGITS][0], rtol=0, atol=1e-5 * scale)
    eps = 1e-4
    for i in range(2):
        edited = cache.clone()
        state = edited.state(layer)
        state[:, head] += eps * deltas[i]
        with torch.no_grad():
            shift = (model(tokens[:, 8:], cache=edited) - model(tokens[:, 8:], cache=cache.clone())) / eps
        assert r_squared(shift, responses[LOGITS][i]) > 0.999
        torch.testing.assert_close(responses[LOGITS][i], shift, rtol=0, atol=2e-2 * float(shift.abs().max()))
    # Other heads' reads do not move; the edited head's does.
    others = [h for h in range(model.cfg.n_heads) if h != head]
    assert responses[read][:, :, :, others].abs().max() == 0 and responses[read][:, :, :, head].abs().max() > 0


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_the_heads_own_reads_follow_the_propagated_edit(arch):
    """By hand: dS_s = alpha_s (I - beta_s k_s k_s^T) dS_{s-1} (no erase for Mamba-2), read dS_s^T q_s."""
    model, _ = tiny_pair(arch, dtype=torch.float64)
    layer, head, t0 = model.cfg.recurrent_layers[1], 3, 5
    tokens = random_tokens(1, 16, seed=3)
    delta = rank2(model, 4)
    names = {n: model.cfg.hook_name(layer, n) for n in ("hook_write_key", "hook_read_query", "hook_log_decay", "hook_recurrence_out")}
    erase_name = model.cfg.hook_name(layer, "hook_beta")
    has_erase = erase_name in model.hook_dict
    _, cache = model.run_with_cache(tokens, names_filter=list(names.values()) + ([erase_name] if has_erase else []))
    key, query = cache[names["hook_write_key"]][0, :, head], cache[names["hook_read_query"]][0, :, head]
    alpha = cache[names["hook_log_decay"]][0, :, head].exp()
    beta = cache[erase_name][0, :, head] if has_erase else torch.zeros_like(alpha)
    expected = torch.zeros(tokens.shape[1], model.cfg.d_v, dtype=torch.float64)
    state = delta.clone()
    expected[t0] = state.T @ query[t0]
    for s in range(t0 + 1, tokens.shape[1]):
        state = alpha[s] * (state - beta[s] * torch.outer(key[s], key[s] @ state))
        expected[s] = state.T @ query[s]
    name = model.cfg.hook_name(layer, f"heads.{head}.hook_state")
    got = linear_responses(model, tokens, name, t0, delta[None], reads=[names["hook_recurrence_out"]])
    torch.testing.assert_close(got[names["hook_recurrence_out"]][0, 0, :, head], expected, rtol=1e-9, atol=1e-12)


@torch.no_grad()
def test_a_one_layer_mamba2_solved_by_hand():
    """dlogits = W_U J_final W_out J_gated_norm (prod alpha) dS^T C, each Jacobian written out."""
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2.tiny_config(num_hidden_layers=1)).double().eval()
    model = HookedRecurrentModel(hf, model_name="one-layer")
    mixer, head, t0 = hf.backbone.layers[0].mixer, 4, 6
    tokens = random_tokens(1, 14, seed=5)
    delta = rank2(model, 6)
    names = ["blocks.0.mixer.hook_read_query", "blocks.0.mixer.hook_log_decay", "blocks.0.mixer.hook_recurrence_out",
             "blocks.0.mixer.hook_skip", "blocks.0.mixer.hook_gate_input", "blocks.0.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    C, log_decay = cache[names[0]][0, :, head], cache[names[1]][0, :, head]
    y = (cache[names[2]] + cache[names[3]])[0].flatten(-2)  # [pos, intermediate]: o + D x
    z, resid = cache[names[4]][0].flatten(-2), cache[names[5]][0]
    group = mixer.norm.group_size
    expected = torch.zeros(tokens.shape[1], model.cfg.d_vocab, dtype=torch.float64)
    for t in range(t0, tokens.shape[1]):
        d_read = log_decay[t0 + 1 : t + 1].sum().exp() * (delta.T @ C[t])  # this head's dy
        dy = torch.zeros_like(y[t])
        dy[head * model.cfg.d_v : (head + 1) * model.cfg.d_v] = d_read
        g, dg = (y[t] * F.silu(z[t])).view(-1, group), (dy * F.silu(z[t])).view(-1, group)
        r = (g.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon).sqrt()
        dn = mixer.norm.weight * (dg / r - g * (g * dg).sum(-1, keepdim=True) / (group * r**3)).flatten()
        d_resid = mixer.out_proj.weight @ dn
        h, norm_f = resid[t], hf.backbone.norm_f
        rf = (h.pow(2).mean() + norm_f.variance_epsilon).sqrt()
        df = norm_f.weight * (d_resid / rf - h * (h @ d_resid) / (h.numel() * rf**3))
        expected[t] = hf.lm_head.weight @ df
    response = linear_response(model, tokens, f"blocks.0.mixer.heads.{head}.hook_state", t0, delta)[0].double()
    # The gated norm computes in float32 (as transformers does), hence the float32 tolerance.
    torch.testing.assert_close(response, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_bad_arguments_name_the_fix():
    model, _ = tiny_pair("tiny-random:mamba2")
    tokens = random_tokens(1, 10)
    name = model.cfg.hook_name(0, "heads.1.hook_state")
    delta = torch.zeros(model.cfg.d_k, model.cfg.d_v)
    with pytest.raises(ValueError, match="position=10 is outside the 10 tokens at positions 0..9"):
        linear_response(model, tokens, name, 10, delta)
    with pytest.raises(ValueError, match="must have the shape of one position's activation"):
        linear_response(model, tokens, name, 3, delta.T)
    with pytest.raises(ValueError, match="head=9 does not index"):
        linear_response(model, tokens, model.cfg.hook_name(0, "hook_state"), 3, delta, head=9)
    with pytest.raises(KeyError, match="No hook point named"):
        linear_response(model, tokens, "blocks.0.mixer.hook_stat", 3, delta)
