"""Hooks shared by every matrix-recurrent mixer: the write, the state, the gates and the read.

A mixer (Gated DeltaNet, Mamba-2, ...) computes its per-position inputs, then hands `recur` two
callables: one that runs the family's own fast kernel (exact with Hugging Face, and the one that
runs when nobody looks at the writes or states), and one that returns the per-position factors of
the recurrence (read query, write key, write value, log-decay, erase; docs/design.md §2 and
`hooked_recurrent.recurrence`). Everything here is mixer-agnostic: which hooks fire and which lanes
(batch element x head) they edited; `hooked_recurrent.mixers.replay` recomputes exactly those lanes.

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
  all-head hook point and are materialised only for hooked heads. Mixers with more than
  `HeadHookList.EAGER_HEADS` heads build a head's hook points only when they are first named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ..components import output_bias
from ..hook_points import HookPoint, fire
from .replay import LaneGroup, RecurrenceFactors, WriteEdits, apply_one_by_one, outer, union

if TYPE_CHECKING:
    from ..blocks import RunContext

__all__ = ["RecurrenceFactors", "HeadHooks", "HeadHookList", "MatrixRecurrentMixer"]


class HeadHooks(nn.Module):
    """One head's view of the write and the state; computed only when hooked."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_write = HookPoint("batch pos d_k d_v")
        self.hook_state = HookPoint("batch pos d_k d_v")


class HeadHookList(nn.Module):
    """The per-head hook containers ``heads.{h}`` of one mixer.

    Up to `EAGER_HEADS` heads they are all built with the mixer, so ``model.hook_dict`` lists them.
    A mixer with more heads (Mamba-1 exposes each of its thousands of channels as a head) builds a
    head's hook points when they are first named (`HookedRecurrentModel` asks for them through
    `__getitem__`): thousands of hook points nobody uses would cost seconds to build and time at
    every forward to check.

    Args:
        n_heads: The mixer's heads.
    """

    EAGER_HEADS = 64

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        if n_heads <= self.EAGER_HEADS:
            for head in range(n_heads):
                self.add_module(str(head), HeadHooks())

    def __len__(self) -> int:
        return self.n_heads

    def __getitem__(self, head: int) -> HeadHooks:
        """Head ``head``'s hook container, built if it was not yet."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} is out of range: this layer has heads 0..{self.n_heads - 1}")
        if str(head) not in self._modules:
            self.add_module(str(head), HeadHooks())
        return self._modules[str(head)]

    def built(self) -> list[tuple[int, HeadHooks]]:
        """``(head, hook container)`` of the heads whose hook points exist."""
        return [(int(name), hooks) for name, hooks in self._modules.items()]


class MatrixRecurrentMixer(nn.Module):
    """Hook points of a matrix-recurrent mixer; `recur` fires them and makes their edits exact.

    What a mixer reads besides its inputs is declared here: ``hf``, the HF module whose
    parameters it computes with (a plain reference, so they stay at their HF path and are never
    copied or re-registered); ``context``, the model's `RunContext` (the padding mask of the
    current call); and `output_projection`, the linear layer that reads the heads' values.

    Args:
        hf_module: The HF token mixer.
        context: The model's run context (None outside a model).
        n_heads: Recurrent heads (lanes per batch element).
        d_k: Key dimension of the state.
        d_v: Value dimension of the state.
        chunk_size: Chunk length of the recurrence when recomputed here.
        per_channel_decay: Whether the decay is one per key channel (``hook_log_decay`` then
            carries ``[batch, pos, head, d_k]``) rather than one per head.
    """

    hf: nn.Module
    context: RunContext | None

    def __init__(
        self,
        hf_module: nn.Module,
        context: RunContext | None,
        n_heads: int,
        d_k: int,
        d_v: int,
        chunk_size: int = 64,
        per_channel_decay: bool = False,
    ) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module  # not a submodule: its parameters keep their HF path
        self.__dict__["context"] = context
        self.n_heads, self.d_k, self.d_v, self.chunk_size = n_heads, d_k, d_v, chunk_size
        self.hook_log_decay = HookPoint("batch pos head d_k" if per_channel_decay else "batch pos head")
        self.hook_write_key = HookPoint("batch pos head d_k")
        self.hook_write_value = HookPoint("batch pos head d_v")
        self.hook_read_query = HookPoint("batch pos head d_k")
        self.hook_write = HookPoint("batch pos head d_k d_v")
        self.hook_state = HookPoint("batch pos head d_k d_v")
        self.hook_recurrence_out = HookPoint("batch pos head d_v")
        self.heads = HeadHookList(n_heads)

    @property
    def output_projection(self) -> nn.Linear:
        """The linear layer that maps the heads' (normed, gated) values to the residual stream."""
        raise NotImplementedError

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        """The output projection per head, TransformerLens' ``W_O`` layout (head values -> residual)."""
        weight = self.output_projection.weight  # [d_model, heads * d_v], head-major columns
        return weight.T.reshape(self.n_heads, self.d_v, weight.shape[0])

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        """The output projection's bias (zeros when it has none)."""
        return output_bias(self.output_projection)

    def output(
        self, core_out: Float[Tensor, "batch pos head d_v"], gate: Float[Tensor, "batch pos *gate"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The gated norm and output projection of the reads (each mixer kind has its own)."""
        raise NotImplementedError

    def output_inputs(self, activations: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
        """What `output` read in a run, from that run's activations of this mixer's hook points.

        Args:
            activations: The cached activation of one of this mixer's hooks, by its short name.
        """
        raise NotImplementedError

    def head_results(self, activations: Callable[[str], Tensor]) -> Float[Tensor, "batch pos head d_model"]:
        """Each head's contribution to the residual stream in a cached run (they sum to ``hook_out``).

        The output projection is linear, so head ``h`` contributes its slice of what the
        projection reads times ``W_O[h]``; that input is recomputed here from the cached reads and
        gates by the mixer's own `output` (its norm may mix heads, as Mamba-2's group norm does).

        Args:
            activations: As for `output_inputs`.
        """
        seen: list[Tensor] = []
        handle = self.output_projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                self.output(*self.output_inputs(activations))
        finally:
            handle.remove()
        values = seen[0].unflatten(-1, (self.n_heads, self.d_v))
        return torch.einsum("bphd,hdm->bphm", values.to(self.W_O.dtype), self.W_O)

    def head_output_weight(self, head: int) -> Float[Tensor, "d_model d_v"]:
        """The columns of the layer's output projection that read head ``head``'s value dimensions.

        (The gated norm between the read and this projection is not included.)
        """
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} is out of range: this layer has {self.n_heads} heads")
        weight = self.output_projection.weight  # [d_model, heads * d_v], head-major columns
        return weight[:, head * self.d_v : (head + 1) * self.d_v]

    def padding_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        """The mask to zero padded inputs with.

        transformers drops the mask for single-token calls (a decode step is never padding), but
        a one-token call can also be the first token of a left-padded prompt continued through a
        cache; the model's run context keeps the mask for that case.
        """
        if attention_mask is None and self.context is not None:
            return self.context.padding_mask
        return attention_mask

    def _looks_at_factors(self) -> bool:
        points = [self.hook_write_key, self.hook_write_value, self.hook_read_query]
        points += [self.hook_write, self.hook_state]
        points += [p for _, h in self.heads.built() for p in (h.hook_write, h.hook_state)]
        return any(p.has_fwd_hooks() for p in points)

    def recur(
        self,
        *,
        factors: Callable[[], RecurrenceFactors],
        native: Callable[[], tuple[Tensor, Tensor | None]] | None,
        initial_state: Float[Tensor, "batch head d_k d_v"] | None,
        output_dtype: torch.dtype,
        private_state: bool = False,
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"] | None]:
        """Run the recurrence, firing the write/state/read hooks and applying their edits.

        Args:
            factors: Returns the per-position factors (called only if some hook needs them).
            native: Runs the architecture's own kernel and returns ``(o, S_T or None)``; None to
                force the recomputation here for every lane (float64 runs, where the kernels of
                transformers compute in float32).
            initial_state: The state before the first position (None = zeros).
            output_dtype: Dtype of the returned reads.
            private_state: ``initial_state`` belongs to this call alone (a fork's copy, see
                `RecurrentCache.in_place`) and, when hooks look at the factors, ``native`` may have
                updated it in place: the recomputed lanes read it before ``native`` runs.

        Returns:
            The reads ``o_t`` (after ``hook_recurrence_out``) and the final state (None only if
            the native kernel was asked for no final state and no lane was recomputed).
        """
        if native is not None and not self._looks_at_factors():
            output, final = native()
            if bool(torch.isfinite(output).all()):
                return self.hook_recurrence_out(output), final
            # A NaN or inf in the inputs: the kernel's chunk products carry it to earlier positions too
            # (0 * NaN is NaN); the recurrence here keeps it causal (`recurrence.chunked_scan`).
            native = None

        f = factors()
        batch, length, n_heads, _ = f.key.shape
        key, key_edits = fire(self.hook_write_key, f.key, 1)
        value, value_edits = fire(self.hook_write_value, f.value, 1)
        query, query_edits = fire(self.hook_read_query, f.query, 1)
        writes = WriteEdits(key, value, union(key_edits, value_edits))
        self._fire_write_hooks(writes)

        device = f.key.device
        lanes_with_write_edits = writes.lanes()
        lanes_with_read_edits = query_edits.any(1) if query_edits is not None else None
        state_heads = self._state_hooked_heads()
        state_lanes = torch.zeros(batch, n_heads, dtype=torch.bool, device=device)
        state_lanes[:, state_heads] = True
        edited = union(lanes_with_write_edits, lanes_with_read_edits)
        edited = torch.zeros_like(state_lanes) if edited is None else edited
        recompute = edited | state_lanes if native is not None else torch.ones_like(state_lanes)

        if initial_state is None:
            initial_state = f.key.new_zeros(batch, n_heads, self.d_k, self.d_v)
        initial_state = initial_state.to(f.key.dtype)
        # The lanes recomputed here take their initial states before the kernel runs (it may update a
        # private state in place).
        with_states = LaneGroup(f, query, writes, initial_state, recompute & state_lanes, self.chunk_size)
        without_states = LaneGroup(f, query, writes, initial_state, recompute & ~state_lanes, self.chunk_size)
        output = final = None
        if native is not None:
            output, final = native()
        without_states.run(return_states=False)
        if with_states.size:
            with_states.run(return_states=True)
            state_edited = self._fire_state_hooks(with_states, batch)
            edited = edited | state_edited

        # Lanes nobody edited keep the native kernel's result bit for bit.
        output_from_here = recompute if native is None else edited
        final_from_here = output_from_here
        if output is None:
            output = f.value.new_zeros(batch, length, n_heads, self.d_v, dtype=output_dtype)
        if final is None:  # the kernel was not asked for it: take every recomputed lane's
            final = initial_state.new_zeros(batch, n_heads, self.d_k, self.d_v)
            final_from_here = recompute
        if not private_state:
            output, final = _writable(output, initial_state), _writable(final, initial_state)
        for group in (with_states, without_states):
            group.scatter_into(output, final, output_from_here, final_from_here)
        return self.hook_recurrence_out(output), final

    def _state_hooked_heads(self) -> list[int]:
        if self.hook_state.has_fwd_hooks():
            return list(range(self.n_heads))
        return [h for h, hooks in self.heads.built() if hooks.hook_state.has_fwd_hooks()]

    def _fire_write_hooks(self, writes: WriteEdits) -> None:
        """Materialise the writes of hooked heads, fire the write hooks, record what changed."""
        if self.hook_write.has_fwd_hooks():
            dense = outer(writes.key, writes.value)
            writes.all_heads, changed = fire(self.hook_write, dense, 2)
            writes.mark(changed)
        for h, hooks in self.heads.built():
            if not hooks.hook_write.has_fwd_hooks():
                continue
            dense, changed = fire(hooks.hook_write, writes.of_head(h), 2)
            writes.dense[h] = dense
            if changed is not None:
                writes.mark_head(h, changed)

    def _fire_state_hooks(self, group: LaneGroup, batch: int) -> Bool[Tensor, "batch head"]:
        """Fire the state hooks one by one, recomputing later states after each edit."""
        edited = torch.zeros(batch, self.n_heads, dtype=torch.bool, device=group.device)

        def replace_all(changed: Tensor, after: Tensor) -> None:  # changed [batch pos head]
            group.replace_states(changed.permute(0, 2, 1), after.permute(0, 2, 1, 3, 4))
            edited.logical_or_(changed.any(1))

        # [batch pos head d_k d_v]
        apply_one_by_one(self.hook_state, lambda: group.states_by_head(batch, self.n_heads), replace_all)
        for h, hooks in self.heads.built():
            if not hooks.hook_state.has_fwd_hooks():
                continue

            def replace_head(changed: Tensor, after: Tensor, h: int = h) -> None:  # changed [batch pos]
                group.replace_head_states(h, changed, after)
                edited[:, h] |= changed.any(1)

            # [batch pos d_k d_v]
            apply_one_by_one(hooks.hook_state, lambda h=h: group.head_states(h, batch), replace_head)
        return edited


def _writable(result: Tensor, initial_state: Tensor) -> Tensor:
    """``result`` (a kernel's, or zeros made here) to write recomputed lanes into: itself when
    nothing else can see it, a copy when autograd may have saved it for the backward pass or it
    shares memory with the initial state (at a fork's batch the state is 100 MB: a copy costs
    as much as the step)."""
    shared = result.untyped_storage().data_ptr() == initial_state.untyped_storage().data_ptr()
    return result.clone() if torch.is_grad_enabled() or shared else result
