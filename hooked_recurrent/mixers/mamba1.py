"""Mamba-1 (the selective scan) with hook points, each channel one head of the matrix recurrence.

A Mamba-1 layer keeps, for each channel ``c`` of its inner width, a state of ``d_state`` numbers::

    h_t[c] = exp(dt_t[c] A[c]) * h_{t-1}[c] + dt_t[c] x_t[c] B_t,    y_t[c] = C_t . h_t[c] + D[c] x_t[c]

(``A[c]`` a vector of ``d_state`` rates, ``*`` elementwise). In the form of docs/design.md §2 each
channel is a head with ``d_k = d_state`` and ``d_v = 1``: the key ``k_t = B_t`` (shared by all
heads, like one Mamba-2 group), the value ``u_t = dt_t[c] x_t[c]``, the query ``q_t = C_t`` and a
decay per key channel ``g_t = dt_t[c] A[c]``. A head's state is the HF state of its channel,
``[d_state, 1]``; the layer's writes together are the rank-1 ``B_t (dt_t x_t)^T``. Mamba-1 layers
have thousands of channels, so their per-head hook points are built only when first named
(`hooked_recurrent.mixers.base.HeadHookList`).

Hook points, in execution order (at ``blocks.{l}.mixer``)::

    hook_x_pre_conv      [batch, pos, head]             x before the short conv (one channel per head)
    hook_gate_input      [batch, pos, head]             z, the output gate's input
    hook_x               [batch, pos, head]             after conv + activation
    hook_dt              [batch, pos, head]             softplus(dt_proj(...) + bias)
    hook_B               [batch, pos, d_state]
    hook_C               [batch, pos, d_state]
    hook_log_decay       [batch, pos, head, d_state]    dt_t[c] A[c] (<= 0)
    hook_write_key       [batch, pos, head, d_state]    B_t, the same for every head
    hook_write_value     [batch, pos, head, 1]          dt_t x_t
    hook_read_query      [batch, pos, head, d_state]    C_t, the same for every head
    hook_write           [batch, pos, head, d_state, 1] (lazy)
    heads.{h}.hook_write [batch, pos, d_state, 1]
    hook_state           [batch, pos, head, d_state, 1] (lazy)
    heads.{h}.hook_state [batch, pos, d_state, 1]
    hook_recurrence_out  [batch, pos, head, 1]          C_t . h_t (without the D skip)
    hook_skip            [batch, pos, head]             D x_t
    hook_out             [batch, pos, d_model]

Without hooks on writes or states, transformers' own selective scan runs (its CUDA kernel when
mamba-ssm is installed). That scan starts from zeros whatever the cache holds, so a multi-token
call continuing a cache is recomputed here from the cached state instead (transformers' own model
drops the state in that case; a prompt followed by one-token steps, as in generation, is exact in
both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformers.models.jamba import modeling_jamba as hf_jamba

from ..hook_points import HookPoint, fire
from .base import MatrixRecurrentMixer, RecurrenceFactors
from .steps import cached_state, mask_padding, short_convolution, store_state

__all__ = ["Mamba1Mixer"]


class Mamba1Mixer(MatrixRecurrentMixer):
    """Hook points of one Mamba-1 mixer; the block calls it in place of the HF module.

    It reads the attribute names of transformers' Mamba-1 mixers (``in_proj``, ``conv1d``,
    ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``...). A family whose mixer transforms
    the selective inputs further (Jamba norms them) overrides `selective_inputs`.

    Args:
        hf_module: The HF Mamba-1 mixer (a plain reference, not re-registered).
        context: The model's `RunContext`.
    """

    # transformers' selective scan over a sequence and its one-token update (kernels when installed).
    scan_kernel: ClassVar = staticmethod(hf_jamba.mamba_selective_scan)
    step_kernel: ClassVar = staticmethod(hf_jamba.mamba_selective_state_update)

    def __init__(self, hf_module: nn.Module, context: Any = None) -> None:
        m = hf_module
        # Recomputed one position at a time: a lane's state is d_state numbers, for which the
        # chunk-parallel form's pairwise decays cost far more than they save.
        super().__init__(m, context, m.intermediate_size, m.ssm_state_size, 1, chunk_size=1, per_channel_decay=True)
        self.hook_x_pre_conv = HookPoint("batch pos head")
        self.hook_gate_input = HookPoint("batch pos head")
        self.hook_x = HookPoint("batch pos head")
        self.hook_dt = HookPoint("batch pos head")
        self.hook_B = HookPoint("batch pos d_state")
        self.hook_C = HookPoint("batch pos d_state")
        self.hook_skip = HookPoint("batch pos head")
        self.hook_out = HookPoint("batch pos d_model")

    @property
    def output_projection(self) -> nn.Linear:
        return self.hf.out_proj

    def selective_inputs(
        self, x: Float[Tensor, "batch pos channel"]
    ) -> tuple[Float[Tensor, "batch pos rank"], Float[Tensor, "batch pos d_state"], Float[Tensor, "batch pos d_state"]]:
        """The low-rank time step, ``B`` and ``C`` projected from the convolved input."""
        m = self.hf
        return torch.split(m.x_proj(x), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)

    def forward(
        self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Same computation and cache updates as transformers' Mamba-1 mixer, with hooks."""
        m = self.hf
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        heads = self.n_heads
        recurrent_state = cached_state(cache, m.layer_idx)  # [batch, channel, d_state]
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        attention_mask = self.padding_mask(attention_mask)

        x, gate = m.in_proj(mask_padding(hidden_states, attention_mask)).chunk(2, dim=-1)
        x = self.hook_x_pre_conv(x)
        gate = self.hook_gate_input(gate)
        x = mask_padding(short_convolution(x, m.conv1d, m.activation, cache, m.layer_idx), attention_mask)
        x = self.hook_x(x)
        time_step, B, C = self.selective_inputs(x)
        B, C = self.hook_B(B), self.hook_C(C)
        # The discretisation the scan applies internally (transformers adds the bias there), done
        # once here so it can be hooked.
        time_step = m.dt_proj.weight @ time_step.transpose(1, 2)  # [batch, channel, pos]
        dt = F.softplus(time_step + m.dt_proj.bias[:, None].to(time_step.dtype)).transpose(1, 2)
        dt = self.hook_dt(dt)
        A = -torch.exp(m.A_log.to(compute_dtype))  # [channel, d_state]

        def log_decay() -> Tensor:
            return dt.to(compute_dtype)[..., None] * A

        decay, decay_edits = None, None  # [batch, pos, head, d_state]: computed when hooked or needed
        if self.hook_log_decay.has_fwd_hooks():
            decay, decay_edits = fire(self.hook_log_decay, log_decay(), 0)
        # The scan starts from zeros: continuing a cache by several tokens is recomputed here.
        continues = recurrent_state is not None and length > 1
        use_native = compute_dtype != torch.float64 and decay_edits is None and not continues

        def native() -> tuple[Tensor, Tensor | None]:
            if recurrent_state is not None:  # one token after the cached ones
                state = recurrent_state.clone()  # the kernel updates it in place
                out = self.step_kernel(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], dt_softplus=False)
                return out[:, None, :, None].to(compute_dtype), state[..., None]
            result = self.scan_kernel(
                x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                return_last_state=cache is not None,
                use_mambapy=m.use_mambapy, use_associative_scan=m.use_associative_scan,
            )  # fmt: skip
            out, final = result if cache is not None else (result, None)
            return out.transpose(1, 2)[..., None].to(compute_dtype), None if final is None else final[..., None]

        def factors() -> RecurrenceFactors:
            # B and C are the same for every head: broadcast views, materialised only for hooks
            # that may edit them in place.
            shape = (batch, length, heads, self.d_k)
            key = B.to(compute_dtype)[:, :, None].expand(shape)
            query = C.to(compute_dtype)[:, :, None].expand(shape)
            if self.hook_write_key.has_fwd_hooks():
                key = key.contiguous()
            if self.hook_read_query.has_fwd_hooks():
                query = query.contiguous()
            return RecurrenceFactors(
                query=query,
                key=key,
                value=(x.to(compute_dtype) * dt.to(compute_dtype))[..., None],
                log_decay=log_decay() if decay is None else decay,
                erase=None,
            )

        initial = None if recurrent_state is None else recurrent_state[..., None].to(compute_dtype)
        reads, final_state = self.recur(
            factors=factors, native=native if use_native else None, initial_state=initial, output_dtype=compute_dtype
        )
        if cache is not None:
            store_state(cache, m.layer_idx, final_state[..., 0].to(dtype).contiguous())

        skip = self.hook_skip(x.to(compute_dtype) * m.D.to(compute_dtype))
        return self.hook_out(self.output(reads + skip[..., None], gate))

    def output(
        self, core_out: Float[Tensor, "batch pos head 1"], gate: Float[Tensor, "batch pos head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The reads (plus the D skip) gated by ``silu(z)``, and the output projection."""
        m = self.hf
        gated = core_out[..., 0] * F.silu(gate.to(core_out.dtype))
        return m.out_proj(gated.to(m.out_proj.weight.dtype))

    def output_inputs(self, activations: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
        return activations("hook_recurrence_out") + activations("hook_skip")[..., None], activations("hook_gate_input")
