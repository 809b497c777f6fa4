"""The sequence walk's forks: only the blocks the edits reach run per condition, and nothing changes."""

import pytest
import torch

from families import FAMILY_PRESETS
from helpers import left_padding_mask, random_tokens, tiny_pair
from hooked_recurrent import RecurrentCache
from hooked_recurrent.edits import delete_writes, scale_writes
from hooked_recurrent.fork import logits_and_residual, run_from_layer
from writesae.protocols import walk as walk_module
from writesae.protocols.walk import SequenceWalk


@pytest.mark.parametrize("arch", FAMILY_PRESETS)
@torch.no_grad()
def test_forks_from_the_edited_block_equal_each_condition_run_alone(arch, monkeypatch):
    """Every condition of a fork (run from the edited block, the blocks below once per sequence)
    equals that condition run alone over its whole sequence, padding included."""
    model, _ = tiny_pair(arch)
    layer = model.cfg.recurrent_layers[-1]
    tokens, mask = random_tokens(2, 14, seed=4), left_padding_mask(2, 14, [0, 3])
    every_head, one_head = model.cfg.hook_name(layer, "hook_write"), model.cfg.hook_name(layer, "heads.1.hook_write")
    started = []
    original = walk_module.run_from_layer
    monkeypatch.setattr(walk_module, "run_from_layer", lambda *a, **k: started.append(a[2]) or original(*a, **k))
    walk = SequenceWalk(model, tokens, mask)
    for t in (5, 9):
        conditions = [
            (0, []),
            (1, [(every_head, delete_writes([t]))]),
            (0, [(one_head, scale_writes([t], 3.0))]),
            (1, []),
        ]
        logits = walk.fork_rows(t, conditions, until=t + 2)
        for i, (row, hooks) in enumerate(conditions):
            alone = model.run_with_hooks(tokens[row : row + 1], attention_mask=mask[row : row + 1], fwd_hooks=hooks)
            torch.testing.assert_close(logits[i], alone[0, t : t + 2], rtol=1e-4, atol=1e-4)
        assert float((logits[1] - logits[3]).abs().max()) > 1e-3  # the deletion does move the logits
    assert started == ([layer, layer] if layer > 0 else [])


@torch.no_grad()
def test_a_cache_of_the_upper_blocks_continues_from_its_block_only():
    model, _ = tiny_pair("tiny-random:qwen3.5")
    layer = model.cfg.recurrent_layers[-1]
    tokens = random_tokens(2, 10, seed=2)
    cache = RecurrentCache(model, 2)
    model(tokens[:, :6], cache=cache)
    rows = [1, 1, 0]
    upper = cache.select(rows, from_layer=layer)
    with pytest.raises(ValueError, match="run_from_layer"):
        model(tokens[rows, 6:7], cache=upper)
    ahead = cache.clone()
    unedited, residual = logits_and_residual(model, tokens[:, 6:8], layer, ahead)
    full = model(tokens)
    torch.testing.assert_close(unedited, full[:, 6:8], rtol=1e-4, atol=1e-4)
    assert ahead.position == 8 and cache.position == 6
    logits = run_from_layer(model, tokens[rows, 6:8], layer, residual[rows], cache=upper)
    torch.testing.assert_close(logits, full[rows, 6:8], rtol=1e-4, atol=1e-4)
    assert upper.position == 8 and cache.position == 6  # the cache the rows were selected from is untouched
    torch.testing.assert_close(model(tokens[:, 6:], cache=cache), full[:, 6:], rtol=1e-4, atol=1e-4)
