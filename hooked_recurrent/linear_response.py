"""The exact first-order effect of an edit on the logits, by forward-mode automatic differentiation.

Adding ``eps * delta`` to an activation at one position (a head's write or state, or any other hook
point) changes the logits at every position by ``eps * R + O(eps^2)``. `linear_response` returns
``R``: the model runs once in forward-mode AD with the edit as the tangent (a Jacobian-vector
product), so ``R`` follows every path the edit takes (the head's own recurrence with its decay and
erase, the read at each later position, the gated norm, the output projection, later layers,
attention across positions, the final norm) with no derivation per architecture. It holds for every
mixer the hooked model runs, and is exact up to floating point: the logits after a real edit of size
``eps`` differ from ``eps * R`` by a term of order ``eps^2``.

Three entry points:

- `linear_response`: one edit, the logits' response ``[batch, pos, d_vocab]`` (zero before the
  edited position).
- `linear_responses`: many edits of the same activation at the same position, one pass for all
  (each edit gets its own rows of a tiled batch), and optionally the responses of other hook points
  (e.g. a layer's ``hook_recurrence_out``: how the edit moves each later read).
- `cache_responses`: edits of a cached state between forward calls (the position already read;
  only later positions see the edit), continued from a `RecurrentCache`.

Forward-mode AD needs every op on the way to have a forward derivative; PyTorch's fused CPU/GPU
attention kernels do not, so attention runs through SDPA's math backend (same result, slower)
during these calls.

Example:
    >>> import torch
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")
    >>> tokens = torch.arange(3, 23)[None]
    >>> name = model.cfg.hook_name(1, "heads.2.hook_state")
    >>> delta = torch.randn(model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(0)) * 1e-4
    >>> response = linear_response(model, tokens, name, 8, delta)
    >>> tuple(response.shape), bool(response[:, :8].eq(0).all())
    ((1, 20, 256), True)
    >>> def add(states, hook):
    ...     states[:, 8] += delta
    ...     return states
    >>> with torch.no_grad():
    ...     shift = model.run_with_hooks(tokens, fwd_hooks=[(name, add)]) - model(tokens)
    >>> bool((shift - response).abs().max() < 1e-2 * response.abs().max())   # equal to first order
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fork import TOKENS_PER_PASS
from .hook_points import observer

if TYPE_CHECKING:
    from .cache import RecurrentCache
    from .model import HookedRecurrentModel

__all__ = ["linear_response", "linear_responses", "cache_responses", "LOGITS"]

LOGITS = "logits"
"""The name under which `linear_responses` and `cache_responses` return the logits' response."""

def linear_response(
    model: HookedRecurrentModel,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    position: int,
    delta: Tensor,
    *,
    head: int | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """The first-order change of the logits when ``delta`` is added to ``hook_name`` at ``position``.

    Args:
        model: The hooked model.
        tokens: The sequences.
        hook_name: Any hook point whose activation is ``[batch, pos, ...]``: typically a head's
            ``heads.{h}.hook_write`` / ``heads.{h}.hook_state`` (``delta`` is ``[d_k, d_v]``, any
            rank), or a layer's ``hook_write`` / ``hook_state`` (``delta`` is ``[head, d_k, d_v]``,
            or ``[d_k, d_v]`` with ``head=``). A state edit is seen by the position's own read and
            every later one (see `cache_responses` for an edit only later positions see).
        position: Absolute position of the edit.
        delta: What is added at that position, for every sequence of the batch.
        head: For a hook point with a head axis after ``pos``: edit this head only.
        attention_mask: Padding mask of ``tokens``.

    Returns:
        ``d logits / d eps`` at ``eps = 0`` for the edit ``eps * delta``: ``[batch, pos, d_vocab]``,
        zero before ``position``.
    """
    return linear_responses(
        model, tokens, hook_name, position, delta[None], head=head, attention_mask=attention_mask
    )[LOGITS][0]


def linear_responses(
    model: HookedRecurrentModel,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    position: int,
    deltas: Tensor,
    *,
    head: int | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    reads: Sequence[str] = (),
    cache: RecurrentCache | None = None,
    max_rows: int | None = None,
) -> dict[str, Tensor]:
    """The first-order responses to several edits of one activation at one position.

    Args:
        model: The hooked model.
        tokens: The sequences.
        hook_name: The edited hook point (see `linear_response`).
        position: Absolute position of the edits.
        deltas: ``[n, ...]``: one edit per leading index, each shaped like the activation at one
            position (or like one head's slice of it, with ``head=``).
        head: Edit this head of a hook point with a head axis.
        attention_mask: Padding mask of ``tokens``.
        reads: Hook points whose responses are returned besides the logits.
        cache: A cache the tokens continue (left untouched); ``position`` stays absolute and must
            fall among the continued tokens.
        max_rows: Most batch rows (edits x sequences) per forward pass; by default about
            ``TOKENS_PER_PASS`` tokens per pass. The results do not depend on it.

    Returns:
        ``{"logits": [n, batch, pos, d_vocab], read: [n, batch, pos, ...] for each read}``.

    Raises:
        ValueError: ``position`` outside the sequence, or a delta of the wrong shape.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    start = 0 if cache is None else cache.position
    if not start <= position < start + tokens.shape[1]:
        raise ValueError(
            f"position={position} is outside the {tokens.shape[1]} tokens at positions {start}..{start + tokens.shape[1] - 1}; "
            "pass a position among them"
        )

    def run(tangents: Tensor) -> dict[str, Tensor]:
        n = tangents.shape[0]
        batch_tokens = tokens.repeat(n, 1)
        mask = None if attention_mask is None else attention_mask.repeat(n, 1)
        per_row = tangents.repeat_interleave(tokens.shape[0], 0)
        edit = (hook_name, _add_tangent(position, per_row, head, hook_name))
        tiled = None if cache is None else cache.repeat(n)
        return _dual_run(model, [edit], reads, lambda: model(batch_tokens, attention_mask=mask, cache=tiled))

    return _in_groups(run, deltas, tokens.shape[0], tokens.shape[1], max_rows)


def cache_responses(
    model: HookedRecurrentModel,
    cache: RecurrentCache,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    deltas: Float[Tensor, "n d_k d_v"],
    *,
    head: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    reads: Sequence[str] = (),
    max_rows: int | None = None,
) -> dict[str, Tensor]:
    """The first-order responses to edits of a cached state, continued over ``tokens``.

    Adding ``eps * deltas[i]`` to ``cache.state(layer)[:, head]`` (the state after the cache's
    last position, which has already been read) and running ``tokens`` changes their logits by
    ``eps * logits_response[i]`` to first order. The cache itself is left untouched.

    Args:
        model: The hooked model.
        cache: The cache after a prefix (position ``p``); ``tokens`` continue it from ``p``.
        tokens: The continuation.
        layer: A matrix-recurrent layer.
        deltas: ``[n, d_k, d_v]`` edits of the state, in the key-by-value layout.
        head: The head whose state is edited.
        attention_mask: Mask of the continuation.
        reads: Hook points whose responses are returned besides the logits.
        max_rows: Most batch rows per pass (see `linear_responses`).

    Returns:
        ``{"logits": [n, batch, pos, d_vocab], read: [n, batch, pos, ...]}`` over the continuation.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    state = cache.state(layer)  # validates the layer
    if not 0 <= head < state.shape[1]:
        raise ValueError(f"head={head} is out of range: layer {layer} has {state.shape[1]} heads")
    if tuple(deltas.shape[1:]) != tuple(state.shape[-2:]):
        raise ValueError(
            f"deltas must be [n, d_k, d_v] = [n, {state.shape[-2]}, {state.shape[-1]}] for layer {layer}, "
            f"got {tuple(deltas.shape)}"
        )

    def run(tangents: Tensor) -> dict[str, Tensor]:
        n = tangents.shape[0]
        tiled = cache.repeat(n)
        mask = None if attention_mask is None else attention_mask.repeat(n, 1)
        per_row = tangents.repeat_interleave(cache.batch_size, 0)

        def forward() -> Tensor:
            slot = tiled.state(layer)[:, head]
            slot += fwAD.make_dual(torch.zeros_like(slot), per_row.to(slot))
            return model(tokens.repeat(n, 1), attention_mask=mask, cache=tiled)

        return _dual_run(model, [], reads, forward)

    return _in_groups(run, deltas, tokens.shape[0], tokens.shape[1], max_rows)


def _in_groups(
    run: Callable[[Tensor], dict[str, Tensor]], deltas: Tensor, batch: int, length: int, max_rows: int | None
) -> dict[str, Tensor]:
    """Run the edits in groups of whole edits (``batch`` rows each), stacked as ``[n, batch, ...]``."""
    if deltas.dim() < 1 or deltas.shape[0] == 0:
        raise ValueError(f"deltas must be [n, ...] with n >= 1, got shape {tuple(deltas.shape)}")
    if max_rows is None:
        max_rows = max(1, TOKENS_PER_PASS // max(length, 1))
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (got {max_rows})")
    per_pass = max(1, max_rows // batch)
    parts: dict[str, list[Tensor]] = {}
    for first in range(0, deltas.shape[0], per_pass):
        group = deltas[first : first + per_pass]
        for name, value in run(group).items():
            parts.setdefault(name, []).append(value.reshape(len(group), batch, *value.shape[1:]))
    return {name: torch.cat(values) for name, values in parts.items()}


def _add_tangent(position: int, tangents: Tensor, head: int | None, hook_name: str) -> Callable:
    """A hook adding a zero with tangent ``tangents`` (one per row) at ``position`` (and ``head``)."""

    def edit(activation: Tensor, hook: Any) -> Tensor:
        i = position - hook.start_position
        if not 0 <= i < activation.shape[1]:
            return activation
        slot = activation[:, i] if head is None else _head_slot(activation, i, head, hook_name)
        if slot.shape != tangents.shape:
            raise ValueError(
                f"a delta for {hook_name!r} must have the shape of one position's activation "
                f"{tuple(slot.shape[1:])}{'' if head is None else f' (head {head})'}, got {tuple(tangents.shape[1:])}"
            )
        edited = activation.clone()
        index = (slice(None), i) if head is None else (slice(None), i, head)
        edited[index] = edited[index] + fwAD.make_dual(torch.zeros_like(slot), tangents.to(slot))
        return edited

    return edit


def _head_slot(activation: Tensor, i: int, head: int, hook_name: str) -> Tensor:
    if activation.dim() < 3 or not 0 <= head < activation.shape[2]:
        raise ValueError(
            f"head={head} does not index {hook_name!r} of shape {tuple(activation.shape)}: pass head= only "
            "for a hook point with a head axis after pos, within its range"
        )
    return activation[:, i, head]


def _dual_run(
    model: HookedRecurrentModel,
    edits: list[tuple[str, Callable]],
    reads: Sequence[str],
    forward: Callable[[], Tensor],
) -> dict[str, Tensor]:
    """Run ``forward`` in forward-mode AD with the edit hooks, keeping the tangents of the reads."""
    tangents: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable:
        @observer
        def keep(activation: Tensor, hook: Any) -> None:
            tangent = fwAD.unpack_dual(activation).tangent
            tangents[name] = torch.zeros_like(activation) if tangent is None else tangent.clone()

        return keep

    hooks = edits + [(name, keeper(name)) for name in reads]
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]), model.hooks(fwd_hooks=hooks):
        logits = forward()
        tangent = fwAD.unpack_dual(logits).tangent
        tangents[LOGITS] = torch.zeros_like(logits) if tangent is None else tangent.clone()
    return tangents

