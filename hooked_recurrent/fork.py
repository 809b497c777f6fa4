"""Many alternative edits from one prefix, in one batched pass.

The prefix is computed once into a `RecurrentCache`; the cache is tiled once per condition and
the continuation runs batched, each condition's hooks acting on its own rows only. Long
continuations run in groups of conditions (about `TOKENS_PER_PASS` tokens per pass): a hook sees
every row of its pass (`on_rows` then picks its condition's), so a write or state hook costs in
proportion to the rows of the pass, and one pass would hold every condition's activations at
once. On a CPU a batch of two 512-token rows runs as fast per token as a batch of one; on a GPU,
where larger batches pay, pass a larger ``max_rows``.
This is how the paper's per-firing comparisons (atom / delete / random at a position t) are run
without recomputing the prefix for every condition, and without conditions leaking into each
other (each condition continues from its own copy of the cache).

Example:
    >>> import torch
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> from hooked_recurrent.edits import delete_writes, scale_writes
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")
    >>> tokens = torch.arange(3, 43)[None]
    >>> name = model.cfg.hook_name(1, "hook_write")
    >>> conditions = [[], [(name, delete_writes([20]))], [(name, scale_writes([20], 3.0))]]
    >>> logits = fork(model, tokens, 20, conditions)   # read at position 20 only
    >>> tuple(logits.shape)
    (3, 1, 1, 256)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .cache import RecurrentCache

if TYPE_CHECKING:
    from .model import HookedRecurrentModel

__all__ = [
    "fork",
    "fork_from",
    "on_rows",
    "Condition",
    "TOKENS_PER_PASS",
    "first_layer",
    "logits_and_residual",
    "run_from_layer",
]

TOKENS_PER_PASS = 1024
"""Default batch rows x continuation tokens per forward pass of a fork."""

Condition = Sequence[tuple[str | Callable[[str], bool], Callable]]
"""One condition: a list of ``(hook name or name filter, hook function)``, as for ``run_with_hooks``."""


def on_rows(fn: Callable, start: int, stop: int) -> Callable:
    """Apply a hook to rows ``start:stop`` of the batch only (in place)."""

    def hook(activation: Tensor, hook) -> Tensor:  # noqa: ANN001 - TransformerLens passes the HookPoint
        part = activation[start:stop]
        result = fn(part, hook=hook)
        if result is not None and result is not part:
            activation[start:stop] = result
        return activation

    hook.__name__ = getattr(fn, "__name__", "condition_hook")
    return hook


def _check_conditions(conditions: Sequence[Condition]) -> None:
    """Refuse an empty list of conditions, and a condition that is not a list of (name, hook) pairs."""
    if not isinstance(conditions, (list, tuple)) or not conditions:
        raise ValueError(
            f"conditions={conditions!r}: give a non-empty list with one list of (hook name, hook function) "
            "pairs per condition, e.g. [[], [(name, delete_writes([t]))]] ([] is the unedited run)"
        )
    for i, condition in enumerate(conditions):
        pairs_ok = isinstance(condition, (list, tuple)) and all(
            isinstance(pair, tuple) and len(pair) == 2 and callable(pair[1]) for pair in condition
        )
        if not pairs_ok:
            raise ValueError(
                f"condition {i} is not a list of (hook name, hook function) pairs (it is a {type(condition).__name__}); "
                "wrap a single pair in a list: [(name, fn)]"
            )


def fork_from(
    model: HookedRecurrentModel,
    cache: RecurrentCache,
    continuation: Int[Tensor, "batch pos"],
    conditions: Sequence[Condition],
    *,
    position: int | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    return_caches: bool = False,
    max_rows: int | None = None,
) -> Float[Tensor, "condition batch pos d_vocab"] | tuple[Tensor, RecurrentCache]:
    """Continue one cache under several conditions at once.

    Args:
        model: The model the cache belongs to.
        cache: The prefix's cache (left untouched).
        continuation: Tokens from ``cache.position`` on (at least one).
        conditions: One list of hooks per condition; an empty list is the unedited run. Hook
            functions see only their condition's rows; positions in them are absolute.
        position: If given, the position the fork must start at (an error says so otherwise).
        attention_mask: Mask of the continuation tokens.
        return_caches: Also return the tiled cache after the continuation (condition-major rows).
        max_rows: Most batch rows per forward pass (whole conditions; at least one per pass). By
            default, ``TOKENS_PER_PASS // continuation length`` rows: short continuations run all
            conditions at once, long ones in groups. The results do not depend on it.

    Returns:
        Logits ``[condition, batch, pos, d_vocab]`` for the continuation positions.
    """
    _check_conditions(conditions)
    if position is not None and position != cache.position:
        if position > cache.position:
            raise ValueError(
                f"cannot fork at position {position}: the cache has only reached position {cache.position}; "
                f"run tokens {cache.position}..{position - 1} into it first"
            )
        raise ValueError(
            f"cannot fork at position {position}: the cache is already at position {cache.position} and "
            "holds no earlier state; fork from a cache saved (cloned) at that position"
        )
    if continuation.dim() == 1:
        continuation = continuation[None]
    if continuation.shape[1] == 0:
        raise ValueError("the continuation needs at least one token (the position to fork at)")
    n, batch = len(conditions), cache.batch_size
    if continuation.shape[0] != batch:
        raise ValueError(f"the continuation has batch size {continuation.shape[0]}, the cache {batch}")
    if max_rows is None:
        max_rows = max(1, TOKENS_PER_PASS // continuation.shape[1])
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (got {max_rows})")
    per_pass = max(1, max_rows // batch)
    logits, caches = [], []
    for first in range(0, n, per_pass):
        group = conditions[first : first + per_pass]
        tiled = cache.repeat(len(group))
        hooks = [
            (name, on_rows(fn, i * batch, (i + 1) * batch)) for i, condition in enumerate(group) for name, fn in condition
        ]
        mask = None if attention_mask is None else attention_mask.repeat(len(group), 1)
        with torch.no_grad():
            out = model.run_with_hooks(continuation.repeat(len(group), 1), cache=tiled, attention_mask=mask, fwd_hooks=hooks)
        logits.append(out.reshape(len(group), batch, *out.shape[1:]))
        caches.append(tiled)
    logits = torch.cat(logits)
    return (logits, RecurrentCache.cat(caches)) if return_caches else logits


def fork(
    model: HookedRecurrentModel,
    tokens: Int[Tensor, "batch pos"],
    position: int,
    conditions: Sequence[Condition],
    *,
    until: int | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    max_rows: int | None = None,
) -> Float[Tensor, "condition batch forked_pos d_vocab"]:
    """Compute ``tokens[:, :position]`` once, then every condition on ``tokens[:, position:until]``.

    Args:
        model: The model.
        tokens: The full sequences.
        position: Where the conditions start (their edits usually sit at this position).
        conditions: One list of hooks per condition (see `fork_from`).
        until: End of the continuation (default: the end of ``tokens``; ``position + 1`` reads
            the conditions at ``position`` only).
        attention_mask: Mask of ``tokens``.
        max_rows: Most batch rows per forward pass (see `fork_from`).

    Returns:
        Logits ``[condition, batch, until - position, d_vocab]``, equal to running each condition
        from scratch over the whole sequence and keeping positions ``position:until``.
    """
    _check_conditions(conditions)
    if tokens.dim() == 1:
        tokens = tokens[None]
    until = tokens.shape[1] if until is None else until
    if not 0 <= position < until <= tokens.shape[1]:
        raise ValueError(f"need 0 <= position < until <= {tokens.shape[1]}, got position={position}, until={until}")
    cache = RecurrentCache(model, tokens.shape[0])
    prefix_mask = None if attention_mask is None else attention_mask[:, :position]
    if position > 0:
        with torch.no_grad():
            model(tokens[:, :position], attention_mask=prefix_mask, cache=cache, return_type=None)
    rest_mask = None if attention_mask is None else attention_mask[:, position:until]
    return fork_from(model, cache, tokens[:, position:until], conditions, attention_mask=rest_mask, max_rows=max_rows)


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def first_layer(conditions: Sequence[Condition]) -> int:
    """The lowest block any condition's hooks sit in (0 if one is a name filter or not in a block;
    0 too when no condition has hooks): the blocks below see the same inputs under every condition."""
    layers = []
    for condition in conditions:
        for name, _ in condition:
            match = _BLOCK.match(name) if isinstance(name, str) else None
            if match is None:
                return 0
            layers.append(int(match.group(1)))
    return min(layers, default=0)


@torch.no_grad()
def logits_and_residual(
    model: HookedRecurrentModel,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    cache: RecurrentCache | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "batch pos d_model"]]:
    """The logits of ``tokens`` and the residual stream entering block ``layer`` on the way, from
    one forward (continuing ``cache``, which advances, as with ``model(tokens, cache=cache)``)."""
    seen: list[Tensor] = []
    hook = (f"blocks.{layer}.hook_resid_pre", lambda residual, hook: seen.append(residual))
    logits = model.run_with_hooks(tokens, cache=cache, attention_mask=attention_mask, fwd_hooks=[hook])
    return logits, seen[0]


def run_from_layer(
    model: HookedRecurrentModel,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    residual: Float[Tensor, "batch pos d_model"],
    *,
    cache: RecurrentCache | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    fwd_hooks: Condition = (),
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of ``tokens`` when ``residual`` enters block ``layer``; the blocks below are skipped.

    Equal to a full forward whose residual stream entering ``layer`` is ``residual`` (as
    `logits_and_residual` gives it), with the hooks of the blocks below never firing.

    Args:
        model: The model.
        tokens: The tokens (the embedding and positions are still theirs; some blocks read them).
        layer: The first block that runs.
        residual: What enters it.
        cache: The memory of the blocks from ``layer`` on (``cache.select(rows, from_layer=layer)``),
            updated in place; or None.
        attention_mask: Mask of ``tokens``.
        fwd_hooks: Hooks, as for ``run_with_hooks`` (those of the skipped blocks never fire).
    """
    if residual.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"the residual {tuple(residual.shape)} does not match the tokens {tuple(tokens.shape)}")
    context = model.context
    if context.start_at_layer is not None:
        raise RuntimeError("run_from_layer is already running in this model (it cannot be nested)")
    context.start_at_layer, context.start_residual = layer, residual
    try:
        return model.run_with_hooks(tokens, cache=cache, attention_mask=attention_mask, fwd_hooks=list(fwd_hooks))
    finally:
        context.start_at_layer = context.start_residual = None
