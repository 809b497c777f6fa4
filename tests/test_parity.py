"""Without edits the hooked model is exactly the HF model, and its write/state hooks are exact."""

import pytest
import torch

from families import FAMILY_PRESETS
from helpers import left_padding_mask, random_tokens, tiny_pair
from reference import factors_from_cache, hf_cached_state, native_write, recurrence, rel_err

LENGTH = 170  # spans several chunks of both recurrence kernels (64 and 32 positions)


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def pair(request):
    return tiny_pair(request.param)


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_logits_match_hf(pair, padded):
    model, hf = pair
    tokens = random_tokens(3, LENGTH)
    mask = left_padding_mask(3, LENGTH, [0, 5, 70]) if padded else None
    expected = hf(input_ids=tokens, attention_mask=mask).logits
    assert (model(tokens, attention_mask=mask) - expected).abs().max() <= 1e-5
    # Observing every hook point (writes and states included) changes nothing.
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert (logits - expected).abs().max() <= 1e-5
    assert model.cfg.hook_name(0, "hook_state") in cache.cache_dict
    # W_U (with a muP logit multiplier folded in) maps the final normed residual to the logits.
    torch.testing.assert_close(cache["ln_final.hook_normalized"] @ model.W_U, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_write_and_state_hooks_match_reference_recurrence(pair):
    model, hf = pair
    tokens = random_tokens(2, LENGTH, seed=1)
    mask = left_padding_mask(2, LENGTH, [0, 9])
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    hf_out = hf(input_ids=tokens, attention_mask=mask, use_cache=True)
    for layer in model.cfg.recurrent_layers:
        name = lambda hook: model.cfg.hook_name(layer, hook)  # noqa: E731
        f = factors_from_cache(model, cache, layer)
        # hook_write is the native write (beta_t k_t v_t^T; B_t (dt_t x_t)^T) ...
        assert rel_err(cache[name("hook_write")], native_write(f)) < 1e-5
        assert rel_err(cache[name("hook_write_key")], f.key) < 1e-6
        assert rel_err(cache[name("hook_write_value")], f.value) < 1e-6
        assert rel_err(cache[name("hook_read_query")], f.query) < 1e-6
        assert rel_err(cache[name("hook_log_decay")], f.log_decay) < 1e-6
        # ... hook_state the state of the step-by-step float64 recurrence, hook_recurrence_out its read ...
        states, reads = recurrence(f)
        assert rel_err(cache[name("hook_state")], states) < 1e-5
        assert rel_err(cache[name("hook_recurrence_out")], reads) < 1e-5
        # ... and its last position the state HF leaves in its cache (seen in the hooks' layout).
        kind = model.architecture.layer_kind(model.cfg.layer_types[layer])
        hf_state = kind.hooked_state(hf_cached_state(hf_out.past_key_values, layer))
        assert rel_err(cache[name("hook_state")][:, -1], hf_state) < 1e-5


@torch.no_grad()
def test_per_head_views_equal_slices(pair):
    model, _ = pair
    tokens = random_tokens(2, 40, seed=2)
    layer = model.cfg.recurrent_layers[1]
    names = [model.cfg.hook_name(layer, h) for h in ("hook_state", "heads.3.hook_state", "hook_write", "heads.0.hook_write")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert torch.equal(cache[names[1]], cache[names[0]][:, :, 3])
    assert torch.equal(cache[names[3]], cache[names[2]][:, :, 0])
    # Alone, a per-head view is computed without the other heads and agrees with them.
    _, alone = model.run_with_cache(tokens, names_filter=names[1])
    assert list(alone.keys()) == [names[1]]
    assert rel_err(alone[names[1]], cache[names[0]][:, :, 3]) < 1e-6


@torch.no_grad()
def test_stop_at_layer_returns_the_residual_stream(pair):
    model, _ = pair
    tokens = random_tokens(2, 20, seed=4)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(model(tokens, stop_at_layer=layer), cache[f"blocks.{layer}.hook_resid_pre"])
    last = model(tokens, stop_at_layer=-1)
    torch.testing.assert_close(last, cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"])
    final = model(tokens, stop_at_layer=model.cfg.n_layers)
    torch.testing.assert_close(final, cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])


@torch.no_grad()
def test_attention_pattern_hook():
    model, hf = tiny_pair("tiny-random:qwen3.5")
    tokens = random_tokens(2, 30, seed=3)
    mask = left_padding_mask(2, 30, [0, 4])
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: ".attn." in n)
    assert (logits - hf(input_ids=tokens, attention_mask=mask).logits).abs().max() <= 1e-5
    pattern = cache["blocks.3.attn.hook_pattern"]
    assert pattern.shape == (2, model.cfg.n_attn_heads, 30, 30)
    torch.testing.assert_close(pattern[0].sum(-1), torch.ones(model.cfg.n_attn_heads, 30))
    torch.testing.assert_close(pattern[1, :, 4:].sum(-1), torch.ones(model.cfg.n_attn_heads, 26))
    assert pattern.triu(1).abs().max() == 0  # causal
    assert pattern[1, :, 10, :4].abs().max() == 0  # padding is never attended
