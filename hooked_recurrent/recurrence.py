"""The matrix recurrence that every supported mixer is written in (docs/design.md §2).

Per lane (one batch element and one head) the state is a matrix ``S`` of shape ``[d_k, d_v]``::

    S_t = alpha_t * (S_{t-1} - e_t k_t (k_t^T S_{t-1})) + k_t u_t^T      # decay/erase, then write
    o_t = S_t^T q_t                                                    # read

``alpha_t = exp(g_t)`` is the decay, ``e_t`` the erase strength (``beta_t`` for Gated DeltaNet,
absent for Mamba-2) and ``k_t u_t^T`` the native rank-1 write. This module computes that
recurrence for a set of lanes, chunk-parallel (the WY/UT form used by the Gated DeltaNet kernels,
which reduces to plain gated linear attention when there is no erase), optionally returning the
state after every position, and with *edits*: at chosen positions the write or the state of
chosen lanes is replaced and the recurrence continues from there. Edits split the chunked
computation at the edited positions instead of falling back to a token-by-token loop.

Everything runs in the dtype of the inputs; callers pass float32 (or float64 for exact checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["RecurrenceInputs", "StepEdit", "RecurrenceResult", "chunked_scan", "step", "run_recurrence"]


@dataclass
class RecurrenceInputs:
    """Per-position inputs of the recurrence for ``lane`` independent lanes.

    Attributes:
        query: Read queries ``q_t``.
        key: Key factors ``k_t`` of the native writes (also the erase direction).
        value: Value factors ``u_t`` of the native writes.
        log_decay: ``g_t = log alpha_t`` (<= 0).
        erase: Erase strengths ``e_t``, or None for no erase (Mamba-2, gated linear attention).
    """

    query: Float[Tensor, "lane pos d_k"]
    key: Float[Tensor, "lane pos d_k"]
    value: Float[Tensor, "lane pos d_v"]
    log_decay: Float[Tensor, "lane pos"]
    erase: Float[Tensor, "lane pos"] | None = None

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def positions(self, start: int, stop: int) -> RecurrenceInputs:
        """The inputs of positions ``start:stop``."""
        return RecurrenceInputs(
            self.query[:, start:stop],
            self.key[:, start:stop],
            self.value[:, start:stop],
            self.log_decay[:, start:stop],
            None if self.erase is None else self.erase[:, start:stop],
        )


@dataclass
class StepEdit:
    """Replacements at one position, for some lanes (the others take the native step).

    Attributes:
        write: Replacement writes ``W_t`` (full ``[d_k, d_v]`` matrices, any rank), with
            ``write_lanes`` saying which lanes use them.
        state: Replacement states ``S_t`` (after the write), with ``state_lanes``. A state
            replacement wins over a write replacement for the same lane.
    """

    write: Float[Tensor, "lane d_k d_v"] | None = None
    write_lanes: Bool[Tensor, " lane"] | None = None
    state: Float[Tensor, "lane d_k d_v"] | None = None
    state_lanes: Bool[Tensor, " lane"] | None = None


@dataclass
class RecurrenceResult:
    """Outputs of a recurrence run.

    Attributes:
        output: Reads ``o_t = S_t^T q_t``.
        final_state: ``S_T`` after the last position.
        states: ``S_t`` after every position, when asked for.
    """

    output: Float[Tensor, "lane pos d_v"]
    final_state: Float[Tensor, "lane d_k d_v"]
    states: Float[Tensor, "lane pos d_k d_v"] | None = None


def chunked_scan(
    inputs: RecurrenceInputs,
    initial_state: Float[Tensor, "lane d_k d_v"],
    chunk_size: int = 64,
    return_states: bool = False,
) -> RecurrenceResult:
    """Run the recurrence over all positions, chunk-parallel.

    Inside a chunk with start state ``S0`` and cumulative log-decay ``G_t``, unrolling gives
    ``S_t = e^{G_t} S0 + sum_{j<=t} e^{G_t-G_j} k_j r_j^T`` where the effective writes
    ``r_t = u_t - e_t alpha_t S_{t-1}^T k_t`` solve one unit-lower-triangular system per chunk.

    Args:
        inputs: Per-position inputs.
        initial_state: State before the first position.
        chunk_size: Positions per chunk (clipped to the sequence length).
        return_states: Also return the state after every position (memory ``pos * d_k * d_v``).

    Returns:
        The reads, the final state and (optionally) every state.
    """
    lanes, length, d_k = inputs.key.shape
    d_v = inputs.value.shape[-1]
    if length == 0:
        empty = inputs.value.new_zeros(lanes, 0, d_v)
        states = inputs.value.new_zeros(lanes, 0, d_k, d_v) if return_states else None
        return RecurrenceResult(empty, initial_state, states)
    chunk = max(1, min(chunk_size, length))
    pad = (-length) % chunk
    n_chunks = (length + pad) // chunk

    def chunks(x: Tensor) -> Tensor:
        # Padded positions have zero write and zero log-decay: the state passes through unchanged.
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(lanes, n_chunks, chunk, *x.shape[2:])

    q, k, u = chunks(inputs.query), chunks(inputs.key), chunks(inputs.value)
    cum = chunks(inputs.log_decay).cumsum(-1)  # [lane, chunk, pos]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    # decay[t, j] = exp(G_t - G_j) for j <= t; masked before exp so nothing overflows.
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    if inputs.erase is not None:
        erase = chunks(inputs.erase)
        erase_key = k * erase[..., None]
        system = (erase_key @ k.transpose(-1, -2)) * decay  # only its strict lower part is read
        # One solve for both right-hand sides: the values and the state-dependent part.
        solved = torch.linalg.solve_triangular(
            system, torch.cat([u, erase_key * cum.exp()[..., None]], dim=-1), upper=False, unitriangular=True
        )
        writes_from_values, writes_from_state = solved[..., :d_v], solved[..., d_v:]
    else:
        writes_from_values, writes_from_state = u, None

    scores = (q @ k.transpose(-1, -2)) * decay  # [lane, chunk, t, j]
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [lane, chunk, 1, 1]

    outputs = []
    all_states = []
    state = initial_state
    # Both reads of the chunk's start state in one product: [writes_from_state; q_decayed] @ state.
    readers = q_decayed if writes_from_state is None else torch.cat([writes_from_state, q_decayed], dim=-2)
    for c in range(n_chunks):
        read = readers[:, c] @ state
        writes = writes_from_values[:, c]
        if writes_from_state is not None:
            writes = writes - read[:, :chunk]
            read = read[:, chunk:]
        outputs.append(read + scores[:, c] @ writes)
        if return_states:
            start_part = cum[:, c].exp()[..., None, None] * state[:, None]
            weighted_keys = decay[:, c, :, :, None] * k[:, c, None, :, :]  # [lane, t, j, d_k]
            all_states.append(start_part + weighted_keys.transpose(-1, -2) @ writes[:, None])
        state = chunk_decay[:, c] * state + k_to_end[:, c].transpose(-1, -2) @ writes

    output = torch.cat(outputs, dim=1)[:, :length]
    states = torch.cat(all_states, dim=1)[:, :length] if return_states else None
    return RecurrenceResult(output, state, states)


def step(
    inputs: RecurrenceInputs,
    state: Float[Tensor, "lane d_k d_v"],
    position: int,
    edit: StepEdit | None = None,
) -> tuple[Float[Tensor, "lane d_v"], Float[Tensor, "lane d_k d_v"]]:
    """Advance the recurrence by one position, applying an edit if given.

    Returns:
        ``(o_t, S_t)``.
    """
    q, k, u = inputs.query[:, position], inputs.key[:, position], inputs.value[:, position]
    alpha = inputs.log_decay[:, position].exp()[:, None, None]
    if inputs.erase is not None:
        erased = inputs.erase[:, position, None, None] * k[:, :, None] * (k[:, None, :] @ state)
        state = state - erased
    write = k[:, :, None] * u[:, None, :]
    if edit is not None and edit.write is not None:
        write = torch.where(edit.write_lanes[:, None, None], edit.write.to(write.dtype), write)
    state = alpha * state + write
    if edit is not None and edit.state is not None:
        state = torch.where(edit.state_lanes[:, None, None], edit.state.to(state.dtype), state)
    return (state * q[:, :, None]).sum(-2), state


def run_recurrence(
    inputs: RecurrenceInputs,
    initial_state: Float[Tensor, "lane d_k d_v"],
    *,
    edits: dict[int, StepEdit] | None = None,
    chunk_size: int = 64,
    return_states: bool = False,
) -> RecurrenceResult:
    """Run the recurrence with edits at some positions.

    The sequence is split at the edited positions: the stretches between them run chunk-parallel
    (`chunked_scan`), each edited position runs one explicit `step`. The cost is that of the
    unedited run plus a small constant per edited position.

    Args:
        inputs: Per-position inputs.
        initial_state: State before the first position.
        edits: ``position -> StepEdit`` (positions relative to ``inputs``).
        chunk_size: See `chunked_scan`.
        return_states: Also return every state.

    Returns:
        The edited run's reads, final state and (optionally) states.
    """
    edits = edits or {}
    length = inputs.length
    outputs: list[Tensor] = []
    states: list[Tensor] = []
    state = initial_state
    start = 0
    for position in sorted(p for p in edits if 0 <= p < length) + [length]:
        if position > start:
            part = chunked_scan(inputs.positions(start, position), state, chunk_size, return_states)
            outputs.append(part.output)
            if return_states:
                states.append(part.states)
            state = part.final_state
        if position == length:
            break
        out, state = step(inputs, state, position, edits[position])
        outputs.append(out[:, None])
        if return_states:
            states.append(state[:, None])
        start = position + 1
    if not outputs:  # zero-length input
        return chunked_scan(inputs, initial_state, chunk_size, return_states)
    return RecurrenceResult(
        torch.cat(outputs, dim=1), state, torch.cat(states, dim=1) if return_states else None
    )
