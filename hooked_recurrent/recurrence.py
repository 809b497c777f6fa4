"""The matrix recurrence that every supported mixer is written in (docs/design.md §2).

Per lane (one batch element and one head) the state is a matrix ``S`` of shape ``[d_k, d_v]``::

    S_t = (I - e_t k_t k_t^T) A_t S_{t-1} + k_t u_t^T      # decay, erase, then write
    o_t = S_t^T q_t                                       # read

The decay ``A_t`` is either one number per lane and position, ``alpha_t = exp(g_t)`` (Gated
DeltaNet, Mamba-2, MiniMax), or one per key channel, ``diag(exp(g_t))`` with ``g_t`` of width
``d_k`` (Kimi Delta Attention; Mamba-1 as one lane per channel with ``d_v = 1``): the scalar decay
is the diagonal one with equal channels, and keeps its own faster path here. ``e_t`` is the erase
strength (``beta_t`` for the delta rule, absent for Mamba-2) and ``k_t u_t^T`` the native rank-1
write. With a scalar decay the update reads ``alpha_t (S_{t-1} - e_t k_t k_t^T S_{t-1}) + k_t u_t^T``.
This module computes that
recurrence for a set of lanes, chunk-parallel (the WY/UT form used by the Gated DeltaNet kernels,
which reduces to plain gated linear attention when there is no erase), optionally returning the
state after every position, and with *edits*: at chosen positions the write or the state of
chosen lanes is replaced and the recurrence continues from there. Edits split the chunked
computation at the edited positions instead of falling back to a token-by-token loop.

Everything runs in the dtype of the inputs; callers pass float32 (or float64 for exact checks).
"""

from __future__ import annotations

from collections.abc import Callable
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
        log_decay: ``g_t = log alpha_t`` (<= 0): one per lane and position, or one per key channel.
        erase: Erase strengths ``e_t``, or None for no erase (Mamba-2, gated linear attention).
    """

    query: Float[Tensor, "lane pos d_k"]
    key: Float[Tensor, "lane pos d_k"]
    value: Float[Tensor, "lane pos d_v"]
    log_decay: Float[Tensor, "lane pos"] | Float[Tensor, "lane pos d_k"]
    erase: Float[Tensor, "lane pos"] | None = None

    @property
    def length(self) -> int:
        return self.key.shape[1]

    @property
    def per_channel_decay(self) -> bool:
        """Whether the decay is diagonal (one per key channel) rather than one number."""
        return self.log_decay.dim() == 3

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

    Inside a chunk with start state ``S0`` and cumulative log-decay ``G_t`` (per key channel
    ``c`` for a diagonal decay), unrolling gives
    ``S_t = e^{G_t} S0 + sum_{j<=t} e^{G_t-G_j} k_j r_j^T`` (the exponentials scaling the rows)
    where the effective writes ``r_t = u_t - e_t (A_t S_{t-1})^T k_t`` solve one
    unit-lower-triangular system per chunk.

    Args:
        inputs: Per-position inputs.
        initial_state: State before the first position.
        chunk_size: Positions per chunk (clipped to the sequence length). A diagonal decay holds
            ``chunk_size * d_k`` numbers per position (the decay between every pair of
            positions of a chunk, per channel), so mixers with tiny states pick small chunks;
            1 runs a loop over positions, the fastest form for states of a few numbers per lane
            (Mamba-1's ``d_k x 1``).
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
    if chunk == 1:  # causal by construction: a NaN or inf spoils its own position and later ones only
        return _token_scan(inputs, initial_state, return_states)
    non_finite = _non_finite_positions(inputs)
    if non_finite is not None:
        return _poisoned_scan(inputs, initial_state, chunk_size, return_states, *non_finite)
    pad = (-length) % chunk
    n_chunks = (length + pad) // chunk

    def chunks(x: Tensor) -> Tensor:
        # Padded positions have zero write and zero log-decay: the state passes through unchanged.
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(lanes, n_chunks, chunk, *x.shape[2:])

    q, k, u = chunks(inputs.query), chunks(inputs.key), chunks(inputs.value)
    erase = None if inputs.erase is None else chunks(inputs.erase)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    if inputs.per_channel_decay:
        cum = chunks(inputs.log_decay).cumsum(2)  # [lane, chunk, pos, d_k]
        row_decay = cum  # per position and channel
    else:
        cum = chunks(inputs.log_decay).cumsum(-1)  # [lane, chunk, pos]
        decay = _masked_exp(cum[..., :, None] - cum[..., None, :], ~causal)  # exp(G_t - G_j), j <= t
        row_decay = cum[..., None]  # broadcast over d_k
    q_decayed = q * row_decay.exp()
    k_to_end = k * (row_decay[:, :, -1:] - row_decay).exp()
    chunk_decay = row_decay[:, :, -1].exp()[..., None]  # [lane, chunk, d_k or 1, 1]: scales the rows

    def within(c: int | slice, pairwise: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The readers of the start state, the writes from the values, and the decayed scores."""
        if erase is None:
            return q_decayed[:, c], u[:, c], pairwise(q[:, c])
        erase_key = k[:, c] * erase[:, c, ..., None]
        system = pairwise(erase_key)  # only its strict lower part is read
        # One solve for both right-hand sides: the values and the state-dependent part.
        rhs = torch.cat([u[:, c], erase_key * row_decay[:, c].exp()], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        # Both reads of the chunk's start state in one product: [writes_from_state; q_decayed] @ state.
        readers = torch.cat([solved[..., d_v:], q_decayed[:, c]], dim=-2)
        return readers, solved[..., :d_v], pairwise(q[:, c])

    if inputs.per_channel_decay:
        # Chunk by chunk: the per-channel decays of a chunk's pairs are the largest tensors here.
        def operators(c: int) -> tuple[Tensor, Tensor, Tensor]:
            return within(c, _DecayedKeys(k[:, c], cum[:, c]).products)

        def pair_decay(c: int) -> Tensor:  # exp(G_tc - G_jc) for j <= t: [lane, t, j, d_k]
            return _masked_exp(cum[:, c, :, None] - cum[:, c, None], ~causal[..., None])

    else:
        all_chunks = within(slice(None), lambda a: (a @ k.transpose(-1, -2)) * decay)

        def operators(c: int) -> tuple[Tensor, Tensor, Tensor]:
            return tuple(x[:, c] for x in all_chunks)

        def pair_decay(c: int) -> Tensor:
            return decay[:, c, ..., None]  # broadcast over d_k

    outputs = []
    all_states = []
    state = initial_state
    for c in range(n_chunks):
        readers, writes, scores = operators(c)
        read = readers @ state
        if erase is not None:
            writes = writes - read[:, :chunk]
            read = read[:, chunk:]
        outputs.append(read + scores @ writes)
        if return_states:
            start_part = row_decay[:, c].exp()[..., None] * state[:, None]
            weighted_keys = pair_decay(c) * k[:, c, None, :, :]  # [lane, t, j, d_k]
            all_states.append(start_part + weighted_keys.transpose(-1, -2) @ writes[:, None])
        state = chunk_decay[:, c] * state + k_to_end[:, c].transpose(-1, -2) @ writes

    output = torch.cat(outputs, dim=1)[:, :length]
    states = torch.cat(all_states, dim=1)[:, :length] if return_states else None
    return RecurrenceResult(output, state, states)


def _masked_exp(exponent: Tensor, masked: Tensor) -> Tensor:
    """``exp`` with the masked entries set to 0 (masked before ``exp``, so nothing overflows)."""
    return exponent.masked_fill(masked, float("-inf")).exp()


class _DecayedKeys:
    """A chunk's keys with a decay per key channel, against which `products` scores any vectors.

    ``products(a)[t, j] = sum_c a_tc k_jc exp(G_tc - G_jc)`` for ``j <= t`` (0 above the
    diagonal). ``G`` falls along positions, so no factor ``exp(-G)`` may be formed. Positions are
    cut into blocks; a pair in blocks ``J < T`` factors as ``exp(G_t - G_m) exp(G_m - G_e)
    exp(G_e - G_j)``, with ``m`` the first position of ``T`` and ``e`` the last of ``J``: every
    exponent is <= 0, and the middle factor is one per pair of blocks, so the rows of a block
    against all earlier positions are one matrix product. Only pairs within a block take the
    per-channel product position by position. Memory per lane is ``pos^2 d_k / block +
    pos * block * d_k``, not ``pos^2 d_k``.

    Args:
        key: ``[lane, pos, d_k]``.
        cum: Cumulative log-decays ``G``, ``[lane, pos, d_k]``.
        block: Positions per block (a chunk whose length it does not divide is one block).
    """

    def __init__(self, key: Float[Tensor, "lane pos d_k"], cum: Float[Tensor, "lane pos d_k"], block: int = 8) -> None:
        lanes, length, d = key.shape
        size = block if length % block == 0 else length
        n = length // size
        self.shape = (lanes, n, size, d)
        g, keys = cum.reshape(self.shape), key.reshape(self.shape)
        first, last = g[:, :, :1], g[:, :, -1:]  # G at the first and last position of each block
        self.to_first = (g - first).exp()  # exp(G_t - G_m(t))
        earlier = torch.ones(n, n, dtype=torch.bool, device=key.device).tril(-1)  # blocks J < T
        between = _masked_exp(first - last.transpose(1, 2), ~earlier[..., None])  # [lane, T, J, d]
        keys_to_last = keys * (last - g).exp()  # exp(G_e(j) - G_j) k_j
        # Block T's view of every earlier key: [lane, T, pos, d] (zero from block T on).
        self.earlier_keys = (keys_to_last[:, None] * between[:, :, :, None]).reshape(lanes, n, length, d)
        causal = torch.ones(size, size, dtype=torch.bool, device=key.device).tril()
        decay = _masked_exp(g[:, :, :, None] - g[:, :, None], ~causal[..., None])  # [lane, n, t, j, d]
        self.inside_keys = keys[:, :, None] * decay
        self.on_diagonal = torch.eye(n, dtype=key.dtype, device=key.device)[:, None, :, None]

    def products(self, a: Float[Tensor, "lane pos d_k"]) -> Float[Tensor, "lane pos pos"]:
        lanes, n, size, d = self.shape
        a = a.reshape(self.shape)
        across = (a * self.to_first) @ self.earlier_keys.transpose(-1, -2)  # [lane, T, t, pos]
        inside = (self.inside_keys @ a[..., None])[..., 0]  # [lane, n, t, j]
        rows = across + (inside[:, :, :, None, :] * self.on_diagonal).reshape(lanes, n, size, n * size)
        return rows.reshape(lanes, n * size, n * size)


def _non_finite_positions(inputs: RecurrenceInputs) -> tuple[Tensor, Tensor] | None:
    """``(bad_read, bad_write)`` per lane and position when some input is NaN or inf, else None."""
    bad_read = ~torch.isfinite(inputs.query).all(-1)
    decay_finite = torch.isfinite(inputs.log_decay).reshape(*inputs.key.shape[:2], -1).all(-1)  # scalar or per channel
    bad_write = ~(torch.isfinite(inputs.key).all(-1) & torch.isfinite(inputs.value).all(-1) & decay_finite)
    if inputs.erase is not None:
        bad_write |= ~torch.isfinite(inputs.erase)
    if not bool(bad_read.any() | bad_write.any()):
        return None
    return bad_read, bad_write


def _poisoned_scan(
    inputs: RecurrenceInputs,
    initial_state: Tensor,
    chunk_size: int,
    return_states: bool,
    bad_read: Tensor,
    bad_write: Tensor,
) -> RecurrenceResult:
    """The scan of inputs holding NaN or inf, as causal as a token-by-token loop.

    Inside a chunk every position meets every other in a matrix product, where a zero weight
    times NaN is still NaN: a non-finite input at position t would reach the outputs of earlier
    positions. So the scan runs on the finite part (bad positions zeroed), and NaN is put back
    where a sequential recurrence puts it: a bad read spoils its own output, a bad write (key,
    value, decay or erase) the state from there on and every output that reads it.
    """
    def clean(x: Tensor, bad: Tensor) -> Tensor:
        return x.masked_fill(bad.reshape(*bad.shape, *([1] * (x.dim() - 2))), 0)

    finite = RecurrenceInputs(
        clean(inputs.query, bad_read), clean(inputs.key, bad_write), clean(inputs.value, bad_write),
        clean(inputs.log_decay, bad_write), None if inputs.erase is None else clean(inputs.erase, bad_write),
    )  # fmt: skip
    result = chunked_scan(finite, initial_state, chunk_size, return_states)
    spoiled_state = bad_write.cummax(-1).values  # [lane, pos]: the state is NaN from the first bad write on
    nan = float("nan")
    output = result.output.masked_fill((spoiled_state | bad_read)[..., None], nan)
    final_state = result.final_state.masked_fill(spoiled_state[:, -1, None, None], nan)
    states = None if result.states is None else result.states.masked_fill(spoiled_state[..., None, None], nan)
    return RecurrenceResult(output, final_state, states)


def _decayed(
    inputs: RecurrenceInputs, state: Float[Tensor, "lane d_k d_v"], position: int
) -> Float[Tensor, "lane d_k d_v"]:
    """``D_t(S_{t-1})``: the decay, then the erase along the key."""
    alpha = inputs.log_decay[:, position].exp()
    state = state * (alpha[:, :, None] if inputs.per_channel_decay else alpha[:, None, None])
    if inputs.erase is not None:
        k = inputs.key[:, position]
        state = state - inputs.erase[:, position, None, None] * k[:, :, None] * (k[:, None, :] @ state)
    return state


def _write(inputs: RecurrenceInputs, position: int) -> Float[Tensor, "lane d_k d_v"]:
    """The native write ``k_t u_t^T``."""
    return inputs.key[:, position, :, None] * inputs.value[:, position, None, :]


def _read(
    inputs: RecurrenceInputs, state: Float[Tensor, "lane d_k d_v"], position: int
) -> Float[Tensor, "lane d_v"]:
    """``S_t^T q_t``."""
    return (state * inputs.query[:, position, :, None]).sum(-2)


def _token_scan(
    inputs: RecurrenceInputs, initial_state: Float[Tensor, "lane d_k d_v"], return_states: bool
) -> RecurrenceResult:
    """The recurrence one position at a time (see `chunked_scan`'s ``chunk_size``)."""
    state = initial_state
    outputs, states = [], []
    for position in range(inputs.length):
        state = _decayed(inputs, state, position) + _write(inputs, position)
        outputs.append(_read(inputs, state, position))
        if return_states:
            states.append(state)
    return RecurrenceResult(
        torch.stack(outputs, dim=1), state, torch.stack(states, dim=1) if return_states else None
    )


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
    state = _decayed(inputs, state, position)
    write = _write(inputs, position)
    if edit is not None and edit.write is not None:
        write = torch.where(edit.write_lanes[:, None, None], edit.write.to(write.dtype), write)
    state = state + write
    if edit is not None and edit.state is not None:
        state = torch.where(edit.state_lanes[:, None, None], edit.state.to(state.dtype), state)
    return _read(inputs, state, position), state


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
