"""Walk each sequence once: one cache advances from position to position, and only the edits fork.

A protocol that edits a sequence at several positions (every firing of the substitution test, every
reference position of the logit shift) needs the model's memory just before each of them. Running
the prefix again for each position costs ``O(positions x length)`` tokens per sequence; advancing
one cache through the sequence and forking only the conditions at each position costs
``O(length)`` plus the forks. `SequenceWalk` does that, for a batch of sequences at once (the
conditions of every sequence at a position share one pass), and with ``recompute=True`` it
recomputes every prefix instead (same results up to float rounding; for checks and benchmarks).

A fork copies and runs only the blocks its edits can reach: when every hook of every condition
sits in block ``l`` or above, the blocks below see the same tokens under every condition. The
walked sequences then run the continuation once, unedited, on a copy of the cache
(`hooked_recurrent.fork.logits_and_residual`): that gives the unedited conditions' logits, the
residual stream entering block ``l`` for all the others, and the walk's cache at the end of the
continuation (taken up when the walk gets there). Each edited condition's copy of the cache holds
and runs (`hooked_recurrent.fork.run_from_layer`) the blocks from ``l`` on only.

Example:
    >>> import torch
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> from hooked_recurrent.edits import delete_writes
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:mamba2")
    >>> walk = SequenceWalk(model, torch.arange(3, 83).reshape(2, 40))   # two sequences, walked together
    >>> name = model.cfg.hook_name(1, "heads.0.hook_write")
    >>> for t in (5, 17, 30):   # increasing positions; no prefix is run twice
    ...     conditions = [(0, []), (0, [(name, delete_writes([t]))]), (1, [(name, delete_writes([t]))])]
    ...     logits = walk.fork_rows(t, conditions, until=t + 1)
    >>> tuple(logits.shape), walk.cache_at(30).position
    ((3, 1, 256), 30)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.cache import RecurrentCache
from hooked_recurrent.fork import TOKENS_PER_PASS, Condition, first_layer, logits_and_residual, on_rows, run_from_layer

__all__ = ["SequenceWalk"]


class SequenceWalk:
    """One cache advanced through ``tokens``, forked at increasing positions.

    Args:
        model: The hooked model.
        tokens: The sequence(s) ``[batch, pos]``.
        attention_mask: Their padding mask.
        recompute: Build every prefix from scratch instead of advancing one cache.
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        recompute: bool = False,
    ) -> None:
        self.model, self.tokens, self.attention_mask, self.recompute = model, tokens, attention_mask, recompute
        self._cache = RecurrentCache(model, tokens.shape[0])
        self._ahead: RecurrentCache | None = None  # the walk further on, computed by a fork

    def _mask(self, start: int, stop: int) -> Tensor | None:
        return None if self.attention_mask is None else self.attention_mask[:, start:stop]

    @torch.no_grad()
    def cache_at(self, position: int) -> RecurrentCache:
        """The cache after ``tokens[:, :position]`` (shared: clone or repeat it before editing).

        Raises:
            ValueError: ``position`` is behind a position already walked (the walk only advances).
        """
        if not 0 <= position <= self.tokens.shape[1]:
            raise ValueError(f"position {position} is outside 0..{self.tokens.shape[1]}")
        ahead = self._ahead
        if ahead is not None and self._cache.position < ahead.position <= position:
            self._cache, self._ahead = ahead, None
        cache = RecurrentCache(self.model, self.tokens.shape[0]) if self.recompute else self._cache
        if position < cache.position:
            raise ValueError(
                f"the walk is at position {cache.position} and cannot go back to {position}: visit positions in increasing order"
            )
        if position > cache.position:
            self.model(self.tokens[:, cache.position : position], attention_mask=self._mask(cache.position, position),
                       cache=cache, return_type=None)  # fmt: skip
        return cache

    def fork_rows(
        self, position: int, conditions: Sequence[tuple[int, Condition]], until: int, max_rows: int | None = None
    ) -> Float[Tensor, "condition forked_pos d_vocab"]:
        """Logits of ``tokens[row, position:until]`` under each ``(row, hooks)`` condition, batched.

        Each condition continues its own copy of sequence ``row``'s cache at ``position``; its hooks
        see its batch row only. Several sequences' conditions share a pass, so the weights are read
        once for all of them. Equal to running each condition alone on its whole sequence.

        Args:
            position: Where the conditions start (their edits usually sit there).
            conditions: ``(row of the walked batch, hooks)`` per condition (hooks as for
                ``run_with_hooks``; an empty list is the unedited run).
            until: End of the continuation.
            max_rows: Most conditions per pass (default: about ``TOKENS_PER_PASS`` tokens per pass).
        """
        cache = self.cache_at(position)
        max_rows = max_rows or max(1, TOKENS_PER_PASS // (until - position))
        # The blocks below the lowest edited one compute the same for every condition: run them once
        # for the walked batch, unless hooks outside the conditions (which would fire fewer times) are on.
        layer = 0 if self.recompute or _hooked(self.model) else first_layer([hooks for _, hooks in conditions])
        tokens = self.tokens[:, position:until]
        if not layer:
            return self._fork(cache, position, conditions, range(len(conditions)), until, max_rows)
        ahead = cache.clone()
        unedited, residual = logits_and_residual(self.model, tokens, layer, ahead, self._mask(position, until))
        self._ahead = ahead
        edited = [i for i, (_, hooks) in enumerate(conditions) if hooks]
        logits = unedited[[row for row, _ in conditions]]  # then the edited conditions' rows replaced
        if edited:
            logits[edited] = self._fork(cache, position, conditions, edited, until, max_rows, layer, residual)
        return logits

    def _fork(
        self,
        cache: RecurrentCache,
        position: int,
        conditions: Sequence[tuple[int, Condition]],
        which: Sequence[int],
        until: int,
        max_rows: int,
        layer: int = 0,
        residual: Tensor | None = None,
    ) -> Float[Tensor, "condition forked_pos d_vocab"]:
        """Logits of the conditions ``which`` in passes of ``max_rows``: the whole model, or from
        block ``layer`` with the walked batch's ``residual`` entering it."""
        logits = []
        for first in range(0, len(which), max_rows):
            group = [conditions[i] for i in which[first : first + max_rows]]
            rows = [row for row, _ in group]
            hooks = [(name, on_rows(fn, i, i + 1)) for i, (_, hooks) in enumerate(group) for name, fn in hooks]
            tokens = self.tokens[rows, position:until]
            mask = None if self.attention_mask is None else self.attention_mask[rows, position:until]
            with torch.no_grad():
                if layer:
                    forked = cache.select(rows, from_layer=layer)
                    forked.in_place = True  # this pass's own copy, dropped after it
                    logits.append(run_from_layer(self.model, tokens, layer, residual[rows], cache=forked,
                                                 attention_mask=mask, fwd_hooks=hooks))  # fmt: skip
                else:
                    logits.append(self.model.run_with_hooks(tokens, cache=cache.select(rows), attention_mask=mask,
                                                            fwd_hooks=hooks))  # fmt: skip
        return torch.cat(logits)


def _hooked(model: Any) -> bool:
    """Whether any hook point of the model has a forward hook now."""
    return any(point.has_fwd_hooks() for point in model.hook_dict.values())
