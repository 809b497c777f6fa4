"""Atom-level edits as hook functions (composable with ``hooks()``, forks and generation).

Each function returns a ``(hook name, hook function)`` pair for one cell. Positions are absolute,
so the same edit works on a full forward, a fork continuation and a single decode step. Writes are
edited through the cell's per-head ``hook_write`` (only that head is materialised); states through
its per-head ``hook_state``.

Which write is "the native write" is a choice (DESIGN §5): ``"native"`` is the paper's
``beta_t k_t v_t^T`` (the additive term; the erase stays), ``"delta"`` is the delta-rule write
``k_t (beta_t (v_t - alpha_t S_{t-1}^T k_t))^T`` that transformers computes (for Mamba-2 both are
``B_t (dt_t x_t)^T``). A ``"delta"`` replacement is applied to the state, given the write it
replaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .cell import Cell

__all__ = [
    "WriteDefinition",
    "replace_write",
    "delete_write",
    "add_to_write",
    "random_rank1",
    "install_direction",
    "amplify_features",
]

WriteDefinition = Literal["native", "delta"]
Hook = tuple[str, Callable[[Tensor, Any], Tensor]]


def _index(hook: Any, position: int, length: int) -> int | None:
    i = position - hook.start_position
    return i if 0 <= i < length else None


def replace_write(
    model: Any,
    cell: Cell,
    position: int,
    matrix: Float[Tensor, "d_k d_v"],
    *,
    definition: WriteDefinition = "native",
    replaced: Float[Tensor, "d_k d_v"] | None = None,
) -> Hook:
    """Replace the cell's write at ``position`` by ``matrix`` (any rank).

    Args:
        model: The hooked model.
        cell: The (layer, head).
        position: Absolute position.
        matrix: The new write.
        definition: ``"native"`` edits ``hook_write``; ``"delta"`` edits the state by
            ``matrix - replaced``, where ``replaced`` is the delta-rule write at that position.
        replaced: Required for ``"delta"``: the write being replaced (e.g. ``S_t - alpha_t S_{t-1}``).
    """
    if definition == "native":

        def edit_write(writes: Tensor, hook: Any) -> Tensor:
            i = _index(hook, position, writes.shape[1])
            if i is not None:
                writes[:, i] = matrix.to(writes)
            return writes

        return cell.hook(model, "heads.{h}.hook_write"), edit_write
    if replaced is None:
        raise ValueError("definition='delta' needs the delta-rule write it replaces (replaced=...)")
    return add_to_state(model, cell, position, matrix - replaced)


def delete_write(model: Any, cell: Cell, position: int, **kwargs: Any) -> Hook:
    """Remove the cell's write at ``position`` (a zero write; see `replace_write`)."""
    zero = torch.zeros(model.cfg.d_k, model.cfg.d_v)
    return replace_write(model, cell, position, zero, **kwargs)


def add_to_write(model: Any, cell: Cell, positions: Sequence[int], deltas: Sequence[Tensor]) -> Hook:
    """Add ``deltas[j]`` to the cell's write at ``positions[j]``."""
    table = dict(zip(positions, deltas))

    def edit_write(writes: Tensor, hook: Any) -> Tensor:
        for position, delta in table.items():
            i = _index(hook, position, writes.shape[1])
            if i is not None:
                writes[:, i] += delta.to(writes)
        return writes

    return cell.hook(model, "heads.{h}.hook_write"), edit_write


def add_to_state(model: Any, cell: Cell, position: int, delta: Float[Tensor, "d_k d_v"]) -> Hook:
    """Add ``delta`` to the cell's state after ``position`` (later states follow)."""

    def edit_state(states: Tensor, hook: Any) -> Tensor:
        i = _index(hook, position, states.shape[1])
        if i is not None:
            states[:, i] += delta.to(states)
        return states

    return cell.hook(model, "heads.{h}.hook_state"), edit_state


def random_rank1(d_k: int, d_v: int, generator: torch.Generator) -> Float[Tensor, "d_k d_v"]:
    """A random rank-1 matrix of unit Frobenius norm (uniform key and value directions)."""
    key = torch.nn.functional.normalize(torch.randn(d_k, generator=generator, dtype=torch.float64), dim=0)
    value = torch.nn.functional.normalize(torch.randn(d_v, generator=generator, dtype=torch.float64), dim=0)
    return torch.outer(key, value).float()


def install_direction(
    model: Any,
    cell: Cell,
    positions: Sequence[int],
    keys: Sequence[Tensor],
    value_direction: Float[Tensor, " d_v"],
    magnitudes: Sequence[float],
) -> Hook:
    """Add ``magnitude_j * k_j v^T`` (unit ``k_j`` and ``v``) to the write at each position."""
    v = torch.nn.functional.normalize(value_direction.float(), dim=0)
    deltas = [m * torch.outer(torch.nn.functional.normalize(k.float(), dim=0), v) for k, m in zip(keys, magnitudes)]
    return add_to_write(model, cell, positions, deltas)


def amplify_features(
    model: Any,
    sae: Any,
    cell: Cell,
    kind: str,
    offsets: dict[int, float],
    positions: Sequence[int] | None = None,
) -> Hook:
    """Raise chosen SAE features by fixed offsets, keeping the SAE's residual.

    ``decode(a + offset) + (x - decode(a)) = x + sum_i offset_i A_i``: the edit adds the offset
    atoms to the cell's state (or write, for a write SAE) at ``positions`` (default: every position,
    including every decode step of a generation).
    """
    atoms = sae.atom_matrices(torch.tensor(list(offsets))).detach().float()
    delta = (torch.tensor(list(offsets.values()))[:, None, None] * atoms).sum(0)
    name = cell.hook(model, "heads.{h}.hook_state" if kind == "state" else "heads.{h}.hook_write")

    def amplify(x: Tensor, hook: Any) -> Tensor:
        if positions is None:
            x += delta.to(x)
        else:
            for position in positions:
                i = _index(hook, position, x.shape[1])
                if i is not None:
                    x[:, i] += delta.to(x)
        return x

    return name, amplify
