"""Hooks shared by every matrix-recurrent mixer: the write, the state, the gates and the read.

A mixer (Gated DeltaNet, Mamba-2) computes its per-position inputs, then hands this class two
callables: one that runs the architecture's own fast kernel (exact with Hugging Face, and the one
that runs when nobody looks at the writes or states), and one that returns the per-position
factors of docs/design.md §2 (read query, write key, write value, log-decay, erase). Everything below is
mixer-agnostic: which hooks fire, which lanes (batch element x head) were edited, and how the
recurrence is recomputed for exactly those lanes.

Semantics (documented on the hook points too):

- ``hook_write_key`` / ``hook_write_value`` / ``hook_write`` edits replace the *write* at the
  edited (batch, position, head); the decay/erase map ``D_t`` keeps its native inputs, and every
  later state and read sees the edit.
- ``hook_read_query`` edits change what that position reads.
- ``hook_state`` edits replace ``S_t`` (a cache edit): the recurrence continues from the
  replaced state. Hooks on ``hook_state`` run one at a time; after a hook edits, the states of
  later positions are recomputed before the next hook (a caching hook added after an editing
  hook sees the edited trajectory).
- ``heads.{h}.hook_write`` / ``heads.{h}.hook_state`` are one head's slices; they run after the
  all-head hook point and are materialised only for hooked heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ..hook_points import HookPoint, changed_mask, fire
from ..recurrence import RecurrenceInputs, RecurrenceResult, StepEdit, run_recurrence

__all__ = ["RecurrenceFactors", "HeadHooks", "MatrixRecurrentMixer"]


@dataclass
class RecurrenceFactors:
    """The docs/design.md §2 factors of every position, in the compute dtype.

    Attributes:
        query: Read queries ``q_t``.
        key: Key factors ``k_t`` of the native writes.
        value: Value factors ``u_t`` of the native writes.
        log_decay: ``log alpha_t``.
        erase: Erase strengths (``beta_t`` for Gated DeltaNet), or None.
    """

    query: Float[Tensor, "batch pos head d_k"]
    key: Float[Tensor, "batch pos head d_k"]
    value: Float[Tensor, "batch pos head d_v"]
    log_decay: Float[Tensor, "batch pos head"]
    erase: Float[Tensor, "batch pos head"] | None


class HeadHooks(nn.Module):
    """One head's view of the write and the state; computed only when hooked."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_write = HookPoint("batch pos d_k d_v")
        self.hook_state = HookPoint("batch pos d_k d_v")


def _outer(key: Tensor, value: Tensor) -> Tensor:
    return key[..., :, None] * value[..., None, :]


class MatrixRecurrentMixer(nn.Module):
    """Hook points of a matrix-recurrent mixer, and the machinery that makes their edits exact.

    Args:
        n_heads: Recurrent heads (lanes per batch element).
        d_k: Key dimension of the state.
        d_v: Value dimension of the state.
        chunk_size: Chunk length of the recurrence when recomputed here.
    """

    def __init__(self, n_heads: int, d_k: int, d_v: int, chunk_size: int = 64) -> None:
        super().__init__()
        self.n_heads, self.d_k, self.d_v, self.chunk_size = n_heads, d_k, d_v, chunk_size
        self.hook_log_decay = HookPoint("batch pos head")
        self.hook_write_key = HookPoint("batch pos head d_k")
        self.hook_write_value = HookPoint("batch pos head d_v")
        self.hook_read_query = HookPoint("batch pos head d_k")
        self.hook_write = HookPoint("batch pos head d_k d_v")
        self.hook_state = HookPoint("batch pos head d_k d_v")
        self.hook_recurrence_out = HookPoint("batch pos head d_v")
        self.heads = nn.ModuleList(HeadHooks() for _ in range(n_heads))

    def head_output_weight(self, head: int) -> Float[Tensor, "d_model d_v"]:
        """The columns of the layer's output projection that read head ``head``'s value dimensions.

        (The gated norm between the read and this projection is not included.)
        """
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} is out of range: this layer has {self.n_heads} heads")
        weight = self.hf.out_proj.weight  # [d_model, heads * d_v], head-major columns
        return weight[:, head * self.d_v : (head + 1) * self.d_v]

    def padding_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        """The mask to zero padded inputs with.

        transformers drops the mask for single-token calls (a decode step is never padding), but
        a one-token call can also be the first token of a left-padded prompt continued through a
        cache; the model's run context keeps the mask for that case.
        """
        if attention_mask is None and getattr(self, "context", None) is not None:
            return self.context.padding_mask
        return attention_mask

    def _looks_at_factors(self) -> bool:
        points = [self.hook_write_key, self.hook_write_value, self.hook_read_query]
        points += [self.hook_write, self.hook_state]
        points += [p for h in self.heads for p in (h.hook_write, h.hook_state)]
        return any(p.has_fwd_hooks() for p in points)

    def recur(
        self,
        *,
        factors: Callable[[], RecurrenceFactors],
        native: Callable[[], tuple[Tensor, Tensor | None]] | None,
        initial_state: Float[Tensor, "batch head d_k d_v"] | None,
        output_dtype: torch.dtype,
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"] | None]:
        """Run the recurrence, firing the write/state/read hooks and applying their edits.

        Args:
            factors: Returns the per-position factors (called only if some hook needs them).
            native: Runs the architecture's own kernel and returns ``(o, S_T or None)``; None to
                force the recomputation here for every lane (float64 runs, where the kernels of
                transformers compute in float32).
            initial_state: The state before the first position (None = zeros).
            output_dtype: Dtype of the returned reads.

        Returns:
            The reads ``o_t`` (after ``hook_recurrence_out``) and the final state (None only if
            the native kernel was asked for no final state and no lane was recomputed).
        """
        if native is not None and not self._looks_at_factors():
            output, final = native()
            return self.hook_recurrence_out(output), final

        f = factors()
        batch, length, n_heads, _ = f.key.shape
        key, key_edits = fire(self.hook_write_key, f.key, 1)
        value, value_edits = fire(self.hook_write_value, f.value, 1)
        query, query_edits = fire(self.hook_read_query, f.query, 1)
        writes = _WriteEdits(key, value, _union(key_edits, value_edits))
        self._fire_write_hooks(writes)

        device = f.key.device
        lanes_with_write_edits = writes.lanes()
        lanes_with_read_edits = query_edits.any(1) if query_edits is not None else None
        state_heads = self._state_hooked_heads()
        state_lanes = torch.zeros(batch, n_heads, dtype=torch.bool, device=device)
        state_lanes[:, state_heads] = True
        edited = _union(lanes_with_write_edits, lanes_with_read_edits)
        edited = torch.zeros_like(state_lanes) if edited is None else edited
        recompute = edited | state_lanes if native is not None else torch.ones_like(state_lanes)

        output = final = None
        if native is not None:
            output, final = native()
        if initial_state is None:
            initial_state = f.key.new_zeros(batch, n_heads, self.d_k, self.d_v)
        initial_state = initial_state.to(f.key.dtype)

        with_states = _LaneGroup(f, query, writes, initial_state, recompute & state_lanes, self.chunk_size)
        without_states = _LaneGroup(f, query, writes, initial_state, recompute & ~state_lanes, self.chunk_size)
        without_states.run(return_states=False)
        if with_states.size:
            with_states.run(return_states=True)
            state_edited = self._fire_state_hooks(with_states, state_heads, batch)
            edited = edited | state_edited

        # Lanes nobody edited keep the native kernel's result bit for bit.
        output_from_here = recompute if native is None else edited
        final_from_here = output_from_here
        if output is None:
            output = f.value.new_zeros(batch, length, n_heads, self.d_v, dtype=output_dtype)
        if final is None:  # the kernel was not asked for it: take every recomputed lane's
            final = initial_state.new_zeros(batch, n_heads, self.d_k, self.d_v)
            final_from_here = recompute
        output, final = output.clone(), final.clone()
        for group in (with_states, without_states):
            group.scatter_into(output, final, output_from_here, final_from_here)
        return self.hook_recurrence_out(output), final

    def _state_hooked_heads(self) -> list[int]:
        if self.hook_state.has_fwd_hooks():
            return list(range(self.n_heads))
        return [h for h, hooks in enumerate(self.heads) if hooks.hook_state.has_fwd_hooks()]

    def _fire_write_hooks(self, writes: _WriteEdits) -> None:
        """Materialise the writes of hooked heads, fire the write hooks, record what changed."""
        if self.hook_write.has_fwd_hooks():
            dense = _outer(writes.key, writes.value)
            dense, changed = fire(self.hook_write, dense, 2)
            for h in range(self.n_heads):
                writes.dense[h] = dense[:, :, h]
            writes.mark(changed)
        for h, hooks in enumerate(self.heads):
            if not hooks.hook_write.has_fwd_hooks():
                continue
            base = writes.dense.get(h)
            if base is None:
                base = _outer(writes.key[:, :, h], writes.value[:, :, h])
            dense, changed = fire(hooks.hook_write, base, 2)
            writes.dense[h] = dense
            if changed is not None:
                writes.mark_head(h, changed)

    def _fire_state_hooks(self, group: _LaneGroup, heads: list[int], batch: int) -> Bool[Tensor, "batch head"]:
        """Fire the state hooks one by one, recomputing later states after each edit."""
        edited = torch.zeros(batch, self.n_heads, dtype=torch.bool, device=group.device)

        def replace_all(changed: Tensor, after: Tensor) -> None:  # changed [batch pos head]
            group.replace_states(changed.permute(0, 2, 1), after.permute(0, 2, 1, 3, 4))
            edited.logical_or_(changed.any(1))

        # [batch pos head d_k d_v]
        _apply_one_by_one(self.hook_state, lambda: group.states_by_head(batch, self.n_heads), replace_all)
        for h in heads:

            def replace_head(changed: Tensor, after: Tensor, h: int = h) -> None:  # changed [batch pos]
                group.replace_head_states(h, changed, after)
                edited[:, h] |= changed.any(1)

            # [batch pos d_k d_v]
            _apply_one_by_one(self.heads[h].hook_state, lambda h=h: group.head_states(h, batch), replace_head)
        return edited


def _union(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


class _WriteEdits:
    """Which (batch, position, head) writes were replaced, and by what."""

    def __init__(self, key: Tensor, value: Tensor, factor_edits: Tensor | None) -> None:
        self.key, self.value = key, value
        self.mask = factor_edits  # [batch pos head] or None
        self.dense: dict[int, Tensor] = {}  # head -> [batch pos d_k d_v] after the write hooks

    def mark(self, changed: Tensor | None) -> None:
        if changed is not None:
            self.mask = _union(self.mask, changed)

    def mark_head(self, head: int, changed: Tensor) -> None:
        if self.mask is None:
            self.mask = torch.zeros(*self.key.shape[:3], dtype=torch.bool, device=self.key.device)
        self.mask[:, :, head] |= changed

    def lanes(self) -> Tensor | None:
        return None if self.mask is None else self.mask.any(1)

    def at(self, position: int, b_idx: Tensor, h_idx: Tensor) -> Float[Tensor, "lane d_k d_v"]:
        """The replacement writes of some lanes at one position."""
        out = _outer(self.key[b_idx, position, h_idx], self.value[b_idx, position, h_idx])
        for h, dense in self.dense.items():
            rows = (h_idx == h).nonzero().flatten()
            if len(rows):
                out[rows] = dense[b_idx[rows], position].to(out.dtype)
        return out


class _LaneGroup:
    """A set of lanes recomputed here (with edits), optionally keeping every state."""

    def __init__(
        self,
        f: RecurrenceFactors,
        query: Tensor,
        writes: _WriteEdits,
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


def _apply_one_by_one(
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
        changed = changed_mask(before, after, 2)
        if changed is not None:
            replace(changed, after)
