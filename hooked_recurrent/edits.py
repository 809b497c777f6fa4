"""Hook functions that edit writes and states, for any matrix-recurrent mixer.

Positions are absolute positions of the sequence (``hook.start_position`` maps them into the
current call), so the same edit works on a full forward, on a continuation from a cache and on
single decode steps. Each works on the all-head hook points (``hook_write`` / ``hook_state``,
``[batch, pos, head, d_k, d_v]``, choosing heads with ``heads=``) and on the per-head ones
(``heads.{h}.hook_write`` / ``heads.{h}.hook_state``, ``[batch, pos, d_k, d_v]``, which are cheaper:
only that head is materialised). All of these edit in place and return the edited activation.

Example:
    >>> import torch
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:mamba2")
    >>> tokens = torch.arange(3, 19)[None]
    >>> name = model.cfg.hook_name(1, "hook_write")
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[(name, delete_writes([4, 9], heads=[2]))])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from jaxtyping import Float
from torch import Tensor

from .hook_points import HookPoint

__all__ = ["positions_in_call", "delete_writes", "scale_writes", "set_writes", "add_to_writes", "add_to_states"]

HookFn = Callable[[Tensor, HookPoint], Tensor]


def _check_positions(positions: Sequence[int]) -> list[int]:
    """Absolute positions are whole numbers >= 0 (-1 is no alias of the last position here)."""
    positions = [positions] if isinstance(positions, int) else list(positions)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(
                f"position {p!r} is not an absolute position: positions count from 0 at the first token of "
                "the sequence (a negative one never occurs, so the edit would silently do nothing)"
            )
    return positions


def _check_heads(heads: Sequence[int] | None) -> list[int] | None:
    if heads is None:
        return None
    heads = [heads] if isinstance(heads, int) else list(heads)
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"head {h!r} is not a head index: give whole numbers >= 0, or heads=None for all")
    return heads


def _check_head_range(heads: Sequence[int], n_heads: int, hook: HookPoint) -> None:
    """Heads past the hook point's head axis (found when the hook first fires, also mid-generate)."""
    bad = [h for h in heads if h >= n_heads]
    if bad:
        raise ValueError(f"head {bad[0]} is out of range at {hook.name}: it has {n_heads} heads (0..{n_heads - 1})")


def positions_in_call(positions: Sequence[int], hook: HookPoint, length: int) -> list[tuple[int, int]]:
    """``(absolute, index in this call)`` for the given absolute positions that fall in the call."""
    start = hook.start_position
    return [(p, p - start) for p in positions if 0 <= p - start < length]


def _slots(tensor: Tensor, index: int, heads: Sequence[int] | None) -> tuple:
    """Index of position ``index`` (and ``heads``) in an all-head or a one-head tensor."""
    if tensor.dim() == 4:  # a per-head view: [batch, pos, d_k, d_v]
        if heads is not None:
            raise ValueError("heads= is for all-head hook points; a heads.{h} hook point is one head already")
        return (slice(None), index)
    return (slice(None), index, slice(None) if heads is None else list(heads))


def scale_writes(positions: Sequence[int], factor: float, heads: Sequence[int] | None = None) -> HookFn:
    """Multiply the writes at ``positions`` (of ``heads``, default all) by ``factor``.

    For ``hook_write`` or ``heads.{h}.hook_write``.

    Raises:
        ValueError: a negative position or head (at once), or a head the hook point does not have
            (when the hook fires).
    """
    positions, heads = _check_positions(positions), _check_heads(heads)

    def hook(writes: Float[Tensor, "batch pos *head d_k d_v"], hook: HookPoint) -> Tensor:
        if heads is not None and writes.dim() == 5:
            _check_head_range(heads, writes.shape[2], hook)
        for _, i in positions_in_call(positions, hook, writes.shape[1]):
            writes[_slots(writes, i, heads)] *= factor
        return writes

    return hook


def delete_writes(positions: Sequence[int], heads: Sequence[int] | None = None) -> HookFn:
    """Remove the writes at ``positions`` (the state keeps only its decayed/erased past there)."""
    return scale_writes(positions, 0.0, heads)


def set_writes(replacements: Mapping[int | tuple[int, int], Float[Tensor, "d_k d_v"]]) -> HookFn:
    """Replace single writes by given matrices (any rank), broadcast over the batch.

    Args:
        replacements: ``{position: matrix}`` for a per-head hook point (``heads.{h}.hook_write``),
            ``{(position, head): matrix}`` for an all-head one (``hook_write``).

    Raises:
        ValueError: a negative position or head (at once), a key that does not fit the hook point
            or a head it does not have (when the hook fires).
    """
    _check_keys(replacements)

    def hook(writes: Float[Tensor, "batch pos *head d_k d_v"], hook: HookPoint) -> Tensor:
        for index, matrix in _located(replacements, writes, hook):
            writes[index] = matrix.to(writes)
        return writes

    return hook


def add_to_writes(additions: Mapping[int | tuple[int, int], Float[Tensor, "d_k d_v"]]) -> HookFn:
    """Add matrices to single writes, broadcast over the batch (keys and errors as in `set_writes`)."""
    _check_keys(additions)

    def hook(writes: Float[Tensor, "batch pos *head d_k d_v"], hook: HookPoint) -> Tensor:
        for index, matrix in _located(additions, writes, hook):
            writes[index] += matrix.to(writes)
        return writes

    return hook


def add_to_states(
    position: int | Sequence[int], delta: Float[Tensor, "d_k d_v"], heads: Sequence[int] | None = None
) -> HookFn:
    """Add ``delta`` to the state after ``position`` (for ``hook_state``); later states follow.

    ``position`` may be several positions, e.g. every decoding step of a generation. Each call
    of the hook sees the states of its own forward call: when the positions arrive one per call
    (decoding), every addition is carried into the later states and they accumulate; within one
    call of several positions a state hook sees the unedited trajectory, so there each position
    gets its native state plus ``delta`` (use one hook per position to carry them forward).
    """
    positions = _check_positions([position] if isinstance(position, int) else position)
    heads = _check_heads(heads)

    def hook(states: Float[Tensor, "batch pos *head d_k d_v"], hook: HookPoint) -> Tensor:
        if heads is not None and states.dim() == 5:
            _check_head_range(heads, states.shape[2], hook)
        if tuple(delta.shape) != tuple(states.shape[-2:]):
            raise ValueError(f"delta has shape {tuple(delta.shape)}; the states of {hook.name} are {tuple(states.shape[-2:])}")
        for _, i in positions_in_call(positions, hook, states.shape[1]):
            states[_slots(states, i, heads)] += delta.to(states)
        return states

    return hook


def _check_keys(table: Mapping[int | tuple[int, int], Tensor]) -> None:
    for key in table:
        position, head = (key, None) if isinstance(key, int) else key
        _check_positions([position])
        _check_heads(head)


def _located(
    table: Mapping[int | tuple[int, int], Tensor], tensor: Tensor, hook: HookPoint
) -> list[tuple[tuple, Tensor]]:
    """``(index into tensor, matrix)`` for the entries of ``table`` whose position is in this call."""
    per_head = tensor.dim() == 4
    located = []
    for key, matrix in table.items():
        if per_head != isinstance(key, int):
            raise ValueError(
                f"{hook.name}: key {key!r} does not fit this hook point; use positions as keys for a "
                "heads.{h} hook point and (position, head) pairs for an all-head one"
            )
        position, head = (key, None) if per_head else key
        if head is not None:
            _check_head_range([head], tensor.shape[2], hook)
        i = position - hook.start_position
        if 0 <= i < tensor.shape[1]:
            located.append(((slice(None), i) if per_head else (slice(None), i, head), matrix))
    return located

