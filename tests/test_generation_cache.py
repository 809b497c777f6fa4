"""Generation with live hooks, and a recurrent cache that can be continued, cloned, edited, saved, forked."""

import pytest
import torch

from families import FAMILY_PRESETS
from helpers import left_padding_mask, random_tokens, tiny_pair
from hooked_recurrent import RecurrentCache
from hooked_recurrent.edits import delete_writes, scale_writes
from hooked_recurrent.fork import fork, fork_from
from reference import rel_err

@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def pair(request):
    return tiny_pair(request.param)


def padded_prompts(length=20, pads=(0, 4, 9), seed=3):
    tokens = random_tokens(len(pads), length, seed=seed)
    mask = left_padding_mask(len(pads), length, list(pads))
    return tokens.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def test_greedy_generation_equals_hf(pair):
    model, hf = pair
    tokens, mask = padded_prompts()
    # transformers' greedy decoding, each step a full forward: independent of any cache (transformers'
    # own MiniMaxCache miscounts positions with left padding; the hooked model's cache does not).
    greedy = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    expected = hf.generate(tokens, eos_token_id=2, **greedy)
    ours = model.generate(tokens, attention_mask=mask, max_new_tokens=12, do_sample=False, verbose=False)
    assert torch.equal(ours, expected)
    # With an end-of-sequence token that one row produces early, rows stop and pad like HF.
    eos = int(expected[1, 22])
    expected = hf.generate(tokens, eos_token_id=eos, **greedy)
    ours = model.generate(tokens, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, verbose=False)
    assert torch.equal(ours, expected)


@torch.no_grad()
def test_hooks_fire_at_every_decode_step_with_absolute_positions(pair):
    model, _ = pair
    calls = []
    name = model.cfg.hook_name(0, "hook_write")
    with model.hooks(fwd_hooks=[(name, lambda w, hook: calls.append((hook.start_position, w.shape[1])))]):
        model.generate(random_tokens(2, 7), max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    assert calls == [(0, 7), (7, 1), (8, 1), (9, 1), (10, 1)]


@torch.no_grad()
def test_edits_at_decode_steps_propagate_to_later_steps(pair):
    model, _ = pair
    tokens = random_tokens(2, 16, seed=5)
    layer = model.cfg.recurrent_layers[-1]
    edit = [(model.cfg.hook_name(layer, "hook_write"), scale_writes([11], 4.0, heads=[1]))]
    full = model.run_with_hooks(tokens, fwd_hooks=edit)
    cache = RecurrentCache(model, 2)
    with model.hooks(fwd_hooks=edit):
        steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(9, 16)]
    stepped = torch.cat(steps, dim=1)
    assert rel_err(stepped, full) < 1e-4
    plain = model(tokens)
    assert (full[:, 12:] - plain[:, 12:]).abs().max() > 1e-3  # later steps see the edit
    # and generation with the edit differs from generation without it
    prompt = tokens[:, :10]
    with model.hooks(fwd_hooks=edit):
        edited = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    unedited = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert edited.shape == unedited.shape == (2, 16)


@pytest.mark.parametrize("split", [1, 40, 64, 97])
@torch.no_grad()
def test_continuing_a_cache_equals_one_pass(pair, split):
    model, _ = pair
    tokens, mask = random_tokens(3, 130, seed=6), left_padding_mask(3, 130, [0, 3, 30])
    whole = model(tokens, attention_mask=mask)
    cache = RecurrentCache(model, 3)
    first = model(tokens[:, :split], attention_mask=mask[:, :split], cache=cache)
    second = model(tokens[:, split:], attention_mask=mask[:, split:], cache=cache)
    assert cache.position == 130
    if "attention" in model.cfg.layer_types:  # what transformers reads positions and masks from
        assert cache.get_seq_length() == 130
    assert rel_err(torch.cat([first, second], 1)[mask.bool()], whole[mask.bool()]) < 1e-5


@torch.no_grad()
def test_clones_are_independent_and_set_state_matches_a_state_hook(pair):
    model, _ = pair
    tokens = random_tokens(2, 50, seed=7)
    layer, head, k = model.cfg.recurrent_layers[0], 1, 30
    cache = RecurrentCache(model, 2)
    model(tokens[:, :k], cache=cache)
    _, acts = model.run_with_cache(tokens[:, :k], names_filter=[model.cfg.hook_name(layer, "hook_state")])
    assert rel_err(cache.state(layer), acts[model.cfg.hook_name(layer, "hook_state")][:, -1]) < 1e-5

    clone = cache.clone()
    new_state = torch.randn(model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(0))
    clone.set_state(layer, new_state, head=head)
    assert (cache.state(layer)[:, head] - new_state).abs().max() > 1e-3  # the original is untouched
    edited = model(tokens[:, k:], cache=clone)
    original = model(tokens[:, k:], cache=cache)
    assert rel_err(original, model(tokens)[:, k:]) < 1e-5

    # A cache edit replaces S_{k-1} after position k-1 has been read: the same as replacing it
    # with a state hook while keeping that position's read unchanged.
    reads_name = model.cfg.hook_name(layer, "hook_recurrence_out")
    _, plain = model.run_with_cache(tokens, names_filter=[reads_name])

    def replace(states, hook):
        states[:, k - 1, head] = new_state

    def keep_read(reads, hook):
        reads[:, k - 1] = plain[reads_name][:, k - 1]

    hooks = [(model.cfg.hook_name(layer, "hook_state"), replace), (reads_name, keep_read)]
    expected = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert rel_err(edited, expected[:, k:]) < 1e-4


@torch.no_grad()
def test_cache_files_round_trip(pair, tmp_path):
    model, _ = pair
    tokens, mask = random_tokens(2, 40, seed=8), left_padding_mask(2, 40, [0, 6])
    cache = RecurrentCache(model, 2)
    model(tokens[:, :25], attention_mask=mask[:, :25], cache=cache)
    path = tmp_path / "prefix.safetensors"
    cache.save(path)
    loaded = RecurrentCache.load(path, model)
    assert loaded.position == 25 and torch.equal(loaded.attention_mask, cache.attention_mask)
    assert torch.equal(model(tokens[:, 25:], cache=loaded), model(tokens[:, 25:], cache=cache))
    assert [p.name for p in tmp_path.iterdir()] == ["prefix.safetensors"]  # no temporary files left


@torch.no_grad()
def test_fork_equals_each_condition_from_scratch(pair):
    model, _ = pair
    tokens = random_tokens(2, 60, seed=9)
    t = 33
    layer = model.cfg.recurrent_layers[1]
    write, state = model.cfg.hook_name(layer, "hook_write"), model.cfg.hook_name(layer, "hook_state")

    def zero_state(states, hook):
        states[:, t - hook.start_position, 0] = 0

    conditions = [[], [(write, delete_writes([t], heads=[2]))], [(write, scale_writes([t], -2.0))], [(state, zero_state)]]
    to_end = fork(model, tokens, t, conditions)
    at_t = fork(model, tokens, t, conditions, until=t + 1)
    assert to_end.shape == (4, 2, 60 - t, model.cfg.d_vocab) and at_t.shape == (4, 2, 1, model.cfg.d_vocab)
    for i, condition in enumerate(conditions):
        scratch = model.run_with_hooks(tokens, fwd_hooks=condition)[:, t:]
        assert rel_err(to_end[i], scratch) < 1e-4, i
        assert rel_err(at_t[i, :, 0], scratch[:, 0]) < 1e-4, i
    assert (to_end[1] - to_end[0]).abs().max() > 1e-3
    # running the conditions in groups of one or three changes nothing
    for rows in (2, 6):
        torch.testing.assert_close(fork(model, tokens, t, conditions, max_rows=rows), to_end, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fork_caches_of_grouped_passes_continue_like_one_pass(pair):
    model, _ = pair
    tokens, mask = random_tokens(2, 40, seed=10), left_padding_mask(2, 40, [0, 5])
    t = 24
    layer = model.cfg.recurrent_layers[0]
    conditions = [[], [(model.cfg.hook_name(layer, "hook_write"), scale_writes([t], 2.0))], []]
    prefix = RecurrentCache(model, 2)
    model(tokens[:, :t], attention_mask=mask[:, :t], cache=prefix)
    one_pass, caches = fork_from(model, prefix, tokens[:, t:30], conditions, attention_mask=mask[:, t:30], return_caches=True)
    grouped, grouped_caches = fork_from(
        model, prefix, tokens[:, t:30], conditions, attention_mask=mask[:, t:30], return_caches=True, max_rows=2
    )
    torch.testing.assert_close(grouped, one_pass, rtol=1e-5, atol=1e-5)
    assert grouped_caches.batch_size == 6 and grouped_caches.position == 30
    assert torch.equal(grouped_caches.attention_mask, caches.attention_mask)
    rest = tokens[:, 30:].repeat(3, 1)
    expected = model(rest, cache=caches.clone())
    torch.testing.assert_close(model(rest, cache=grouped_caches), expected, rtol=1e-5, atol=1e-5)
    # cat undoes select
    halves = RecurrentCache.cat([caches.select([0, 1, 2]), caches.select([3, 4, 5])])
    torch.testing.assert_close(model(rest, cache=halves), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions 30 and 24"):
        RecurrentCache.cat([caches, prefix])


@torch.no_grad()
def test_bad_cache_use_says_what_is_wrong(pair):
    model, _ = pair
    other, _ = tiny_pair(FAMILY_PRESETS[0], seed=1)
    tokens = random_tokens(2, 12)
    cache = RecurrentCache(model, 2)
    model(tokens[:, :6], cache=cache)
    with pytest.raises(ValueError, match="batch size 3"):
        model(random_tokens(3, 2), cache=cache)
    with pytest.raises(ValueError, match="another model"):
        other(tokens[:, 6:], cache=cache)
    with pytest.raises(ValueError, match="only reached position 6"):
        fork_from(model, cache, tokens[:, 8:], [[]], position=8)
    with pytest.raises(ValueError, match="already at position 6"):
        fork_from(model, cache, tokens[:, 4:], [[]], position=4)
    with pytest.raises(IndexError, match="head 99"):
        cache.set_state(model.cfg.recurrent_layers[0], torch.zeros(model.cfg.d_k, model.cfg.d_v), head=99)
    broken = cache.clone()
    with pytest.raises(ZeroDivisionError):
        model.run_with_hooks(tokens[:, 6:], cache=broken, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: 1 / 0)])
    with pytest.raises(ValueError, match="incomplete"):
        model(tokens[:, 6:], cache=broken)
    model(tokens[:, 6:], cache=cache)  # the original is unaffected
