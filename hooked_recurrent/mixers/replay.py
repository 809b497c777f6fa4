"""The edit-replay engine behind the write and state hooks of every matrix-recurrent mixer.

A mixer's hook container (`hooked_recurrent.mixers.base`) fires the hooks; this module remembers
what they changed and recomputes the recurrence for exactly the lanes (batch element x head) that
changed, with `hooked_recurrent.recurrence.run_recurrence`:

- `WriteEdits`: which (batch, position, head) writes the write hooks replaced, and by what.
- `LaneGroup`: a set of lanes recomputed here, optionally keeping every state so that state hooks
  can see them and replace some; each replacement re-runs the positions after it.
- `apply_one_by_one`: the hooks of a state hook point, applied in turn, each seeing the states
  recomputed after the edits of the hooks before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..hook_points import HookPoint, edited_mask
from ..recurrence import RecurrenceInputs, RecurrenceResult, StepEdit, run_recurrence

__all__ = ["RecurrenceFactors", "WriteEdits", "LaneGroup", "apply_one_by_one", "union", "outer"]


@dataclass
class RecurrenceFactors:
    """The factors of every position (see `hooked_recurrent.recurrence`), in the compute dtype.

    Attributes:
        query: Read queries ``q_t``.
        key: Key factors ``k_t`` of the native writes.
        value: Value factors ``u_t`` of the native writes.
        log_decay: ``log alpha_t``: one per head, or one per key channel (a diagonal decay).
        erase: Erase strengths (``beta_t`` for the delta rule), or None.
    """

    query: Float[Tensor, "batch pos head d_k"]
    key: Float[Tensor, "batch pos head d_k"]
    value: Float[Tensor, "batch pos head d_v"]
    log_decay: Float[Tensor, "batch pos head"] | Float[Tensor, "batch pos head d_k"]
    erase: Float[Tensor, "batch pos head"] | None


def outer(key: Tensor, value: Tensor) -> Tensor:
    """Rank-1 writes ``key value^T`` over leading dimensions."""
    return key[..., :, None] * value[..., None, :]


def union(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Elementwise or of two optional masks."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b


class WriteEdits:
    """Which (batch, position, head) writes were replaced, and by what."""

    def __init__(self, key: Tensor, value: Tensor, factor_edits: Tensor | None) -> None:
        self.key, self.value = key, value
        self.mask = factor_edits  # [batch pos head] or None
        self.all_heads: Tensor | None = None  # [batch pos head d_k d_v] after the all-head write hook
        self.dense: dict[int, Tensor] = {}  # head -> [batch pos d_k d_v] after its per-head write hook

    def mark(self, changed: Tensor | None) -> None:
        if changed is not None:
            self.mask = union(self.mask, changed)

    def mark_head(self, head: int, changed: Tensor) -> None:
        if self.mask is None:
            self.mask = torch.zeros(*self.key.shape[:3], dtype=torch.bool, device=self.key.device)
        self.mask[:, :, head] |= changed

    def lanes(self) -> Tensor | None:
        return None if self.mask is None else self.mask.any(1)

    def of_head(self, head: int) -> Float[Tensor, "batch pos d_k d_v"]:
        """One head's writes after the hooks fired so far."""
        if head in self.dense:
            return self.dense[head]
        if self.all_heads is not None:
            return self.all_heads[:, :, head]
        return outer(self.key[:, :, head], self.value[:, :, head])

    def at(self, position: int, b_idx: Tensor, h_idx: Tensor) -> Float[Tensor, "lane d_k d_v"]:
        """The replacement writes of some lanes at one position."""
        if self.all_heads is not None:
            out = self.all_heads[b_idx, position, h_idx]
        else:
            out = outer(self.key[b_idx, position, h_idx], self.value[b_idx, position, h_idx])
        for h, dense in self.dense.items():
            rows = (h_idx == h).nonzero().flatten()
            if len(rows):
                out[rows] = dense[b_idx[rows], position].to(out.dtype)
        return out


class LaneGroup:
    """A set of lanes recomputed here (with edits), optionally keeping every state."""

    def __init__(
        self,
        f: RecurrenceFactors,
        query: Tensor,
        writes: WriteEdits,
        initial_state: Tensor,
        lanes: Bool[Tensor, "batch head"],
        chunk_size: int,
    ) -> None:
        self.b_idx, self.h_idx = lanes.nonzero(as_tuple=True)
        self.size = len(self.b_idx)
        self.device = f.key.device
        self.chunk_size = chunk_size
        self.writes = writes
        b, h = self.b_idx, self.h_idx
        self.inputs = RecurrenceInputs(
            query=query[b, :, h],
            key=f.key[b, :, h],
            value=f.value[b, :, h],
            log_decay=f.log_decay[b, :, h],
            erase=None if f.erase is None else f.erase[b, :, h],
        )
        self.initial_state = initial_state[b, h]
        self.write_mask = writes.mask[b, :, h] if writes.mask is not None else None  # [lane pos]
        self.state_edits: dict[int, tuple[Tensor, Tensor]] = {}  # pos -> (lane mask, states)
        self.result: RecurrenceResult | None = None

    def _edits(self, start: int) -> dict[int, StepEdit]:
        edits: dict[int, StepEdit] = {}
        if self.write_mask is not None:
            for position in self.write_mask.any(0).nonzero().flatten().tolist():
                if position < start:
                    continue
                lanes = self.write_mask[:, position]
                edits[position - start] = StepEdit(
                    write=self.writes.at(position, self.b_idx, self.h_idx), write_lanes=lanes
                )
        for position, (lanes, states) in self.state_edits.items():
            if position < start:
                continue
            edit = edits.setdefault(position - start, StepEdit())
            edit.state, edit.state_lanes = states, lanes
        return edits

    def run(self, return_states: bool) -> None:
        if not self.size:
            return
        self.result = run_recurrence(
            self.inputs,
            self.initial_state,
            edits=self._edits(0),
            chunk_size=self.chunk_size,
            return_states=return_states,
        )

    def _rerun_from(self, start: int) -> None:
        """Recompute positions ``start:`` from the (kept) state before ``start``."""
        assert self.result is not None and self.result.states is not None
        before = self.initial_state if start == 0 else self.result.states[:, start - 1]
        tail = run_recurrence(
            self.inputs.positions(start, self.inputs.length),
            before,
            edits=self._edits(start),
            chunk_size=self.chunk_size,
            return_states=True,
        )
        self.result.output[:, start:] = tail.output
        self.result.states[:, start:] = tail.states
        self.result.final_state = tail.final_state

    def _add_state_edits(self, lane_changed: Tensor, new_states: Tensor) -> None:
        """``lane_changed``: [lane pos]; ``new_states``: [lane pos d_k d_v]."""
        positions = lane_changed.any(0).nonzero().flatten().tolist()
        for position in positions:
            lanes = lane_changed[:, position]
            states = new_states[:, position]
            if position in self.state_edits:
                old_lanes, old_states = self.state_edits[position]
                states = torch.where(lanes[:, None, None], states, old_states)
                lanes = lanes | old_lanes
            self.state_edits[position] = (lanes, states.clone())
        self._rerun_from(positions[0])

    def states_by_head(self, batch: int, n_heads: int) -> Tensor:
        """All states as ``[batch pos head d_k d_v]`` (this group holds every lane)."""
        states = self.result.states  # lanes in (batch, head) row-major order
        return states.reshape(batch, n_heads, *states.shape[1:]).transpose(1, 2).contiguous()

    def replace_states(self, changed: Tensor, after: Tensor) -> None:
        """``changed``: [batch head pos]; ``after``: [batch head pos d_k d_v] (all lanes)."""
        self._add_state_edits(changed.reshape(self.size, -1), after.reshape(self.size, *after.shape[2:]))

    def _rows_of_head(self, head: int) -> Tensor:
        return (self.h_idx == head).nonzero().flatten()

    def head_states(self, head: int, batch: int) -> Tensor:
        rows = self._rows_of_head(head)
        return self.result.states[rows]  # rows are batch-ordered for a fixed head

    def replace_head_states(self, head: int, changed: Tensor, after: Tensor) -> None:
        rows = self._rows_of_head(head)
        lane_changed = torch.zeros(self.size, changed.shape[1], dtype=torch.bool, device=self.device)
        lane_changed[rows] = changed
        new_states = self.result.states.clone()
        new_states[rows] = after.to(new_states.dtype)
        self._add_state_edits(lane_changed, new_states)

    def scatter_into(
        self,
        output: Tensor,
        final: Tensor,
        output_lanes: Bool[Tensor, "batch head"],
        final_lanes: Bool[Tensor, "batch head"],
    ) -> None:
        """Copy this group's reads and final states into the full tensors, for the chosen lanes."""
        if not self.size or self.result is None:
            return

        def lanes_of(selected: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
            keep = selected[self.b_idx, self.h_idx]
            return (keep, self.b_idx[keep], self.h_idx[keep]) if keep.any() else None

        reads = lanes_of(output_lanes)
        if reads is not None:
            keep, b, h = reads
            output[b, :, h] = self.result.output[keep].to(output.dtype)
        finals = lanes_of(final_lanes)
        if finals is not None:
            keep, b, h = finals
            final[b, h] = self.result.final_state[keep].to(final.dtype)


def apply_one_by_one(
    hook_point: HookPoint, view: Callable[[], Tensor], replace: Callable[[Tensor, Tensor], None]
) -> None:
    """Apply a state hook point's hooks in turn, each to a fresh ``view()`` (so it sees the
    states recomputed after earlier edits), and hand each edit to ``replace(changed, after)``."""
    for apply, observes in hook_point.iter_forward_hooks():
        current = view()
        if observes:
            apply(current)
            continue
        before = current.clone()
        after = apply(current)
        changed = edited_mask(before, current, after, 2)
        if changed is not None:
            replace(changed, after)
