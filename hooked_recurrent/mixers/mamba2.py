"""Mamba-2 (SSD) with hook points, in the same matrix-recurrence convention as Gated DeltaNet.

Hook points, in execution order (at ``blocks.{l}.mixer``)::

    hook_x_pre_conv      [batch, pos, head, head_dim]   x projection before the short conv
    hook_B_pre_conv      [batch, pos, group, d_state]
    hook_C_pre_conv      [batch, pos, group, d_state]
    hook_gate_input      [batch, pos, head, head_dim]   z, the gated norm's gate
    hook_x               [batch, pos, head, head_dim]   after conv + SiLU
    hook_B               [batch, pos, group, d_state]
    hook_C               [batch, pos, group, d_state]
    hook_dt              [batch, pos, head]             softplus(dt + dt_bias), clamped to the limit
    hook_log_decay       [batch, pos, head]             dt * A_h (<= 0)
    hook_write_key       [batch, pos, head, d_state]    B_t, broadcast from its group
    hook_write_value     [batch, pos, head, head_dim]   dt_t x_t
    hook_read_query      [batch, pos, head, d_state]    C_t, broadcast from its group
    hook_write           [batch, pos, head, d_state, head_dim]   B_t (dt_t x_t)^T (lazy)
    heads.{h}.hook_write [batch, pos, d_state, head_dim]
    hook_state           [batch, pos, head, d_state, head_dim]   S_t after the write (lazy)
    heads.{h}.hook_state [batch, pos, d_state, head_dim]
    hook_recurrence_out  [batch, pos, head, head_dim]   o_t = S_t^T C_t (without the D skip)
    hook_skip            [batch, pos, head, head_dim]   D_h x_t
    hook_out             [batch, pos, d_model]

The recurrence is ``S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T``. States are exposed in the
key-by-value layout ``[d_state, head_dim]``: the transpose of what transformers stores, so that code
written against ``hook_write`` / ``hook_state`` works on Gated DeltaNet and Mamba-2 alike.
The fused training kernel of mamba-ssm is never used here; the unfused path runs in all modes.
An edit of ``hook_log_decay`` recomputes the recurrence here for every head (the Mamba-2 kernels
take ``dt`` and ``A`` separately, not their product).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformers.models.mamba2 import modeling_mamba2 as hf_mamba

from ..hook_points import HookPoint, fire
from .base import MatrixRecurrentMixer, RecurrenceFactors
from .steps import cached_state, hooked_split, mask_padding, short_convolution, store_state

__all__ = ["Mamba2Mixer"]


class Mamba2Mixer(MatrixRecurrentMixer):
    """Hook points of one Mamba-2 mixer; the block calls it in place of the HF module.

    It reads the attribute names transformers' Mamba-2 mixers share (``in_proj``, ``conv1d``,
    ``A_log``, ``dt_bias``, ``D``, ``norm``, ``out_proj``...): Mamba-2's, Bamba's, NemotronH's,
    Granite 4's and Zamba2's compute exactly this. A family whose mixer scales its projections or
    gates its output otherwise (Falcon-H1) overrides `project` and `gated_norm`.

    Args:
        hf_module: The ``Mamba2Mixer`` it computes with (a plain reference, not re-registered).
        context: The model's `RunContext`.
    """

    def __init__(self, hf_module: nn.Module, context: Any = None) -> None:
        super().__init__(hf_module, context, hf_module.num_heads, hf_module.ssm_state_size, hf_module.head_dim)
        self.hook_x_pre_conv = HookPoint("batch pos head head_dim")
        self.hook_B_pre_conv = HookPoint("batch pos group d_state")
        self.hook_C_pre_conv = HookPoint("batch pos group d_state")
        self.hook_gate_input = HookPoint("batch pos head head_dim")
        self.hook_x = HookPoint("batch pos head head_dim")
        self.hook_B = HookPoint("batch pos group d_state")
        self.hook_C = HookPoint("batch pos group d_state")
        self.hook_dt = HookPoint("batch pos head")
        self.hook_skip = HookPoint("batch pos head head_dim")
        self.hook_out = HookPoint("batch pos d_model")

    @property
    def output_projection(self) -> nn.Linear:
        return self.hf.out_proj

    def project(self, hidden_states: Tensor) -> Float[Tensor, "batch pos channel"]:
        """The input projection: gate, x, B, C and dt side by side."""
        return self.hf.in_proj(hidden_states)

    def gated_norm(
        self, scan_output: Float[Tensor, "batch pos inner"], gate: Float[Tensor, "batch pos inner"]
    ) -> Float[Tensor, "batch pos inner"]:
        """The gated RMSNorm of the heads' outputs (reads plus skip) before the output projection."""
        return self.hf.norm(scan_output, gate)

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Same computation and cache updates as ``Mamba2Mixer.forward`` (unfused), with hooks."""
        m = self.hf
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        heads, head_dim, groups, d_state = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
        recurrent_state = cached_state(cache, m.layer_idx)  # [b h head_dim d_state]

        # float32 like the kernels, except for float64 models (exact checks).
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        attention_mask = self.padding_mask(attention_mask)
        hidden_states = mask_padding(hidden_states, attention_mask)
        projected = self.project(hidden_states)
        A = -torch.exp(m.A_log.to(compute_dtype))
        gate, xBC, dt = projected.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        gate = self.hook_gate_input(gate.reshape(batch, length, heads, head_dim)).reshape(batch, length, -1)
        pre_conv = [self.hook_x_pre_conv, self.hook_B_pre_conv, self.hook_C_pre_conv]
        xBC = hooked_split(xBC, list(zip(pre_conv, [heads, groups, groups], [head_dim, d_state, d_state])))
        xBC = mask_padding(short_convolution(xBC, m.conv1d, m.activation, cache, m.layer_idx), attention_mask)
        x, B, C = torch.split(xBC, [m.intermediate_size, groups * d_state, groups * d_state], dim=-1)
        x = self.hook_x(x.reshape(batch, length, heads, head_dim))
        B = self.hook_B(B.reshape(batch, length, groups, d_state))
        C = self.hook_C(C.reshape(batch, length, groups, d_state))

        # The same discretisation the kernels apply internally, done once here so it can be hooked.
        dt = F.softplus(dt + m.dt_bias.to(dt.dtype))
        dt = self.hook_dt(torch.clamp(dt, m.time_step_limit[0], m.time_step_limit[1]))
        log_decay, decay_edits = fire(self.hook_log_decay, dt.to(compute_dtype) * A, 0)
        use_native = compute_dtype != torch.float64 and decay_edits is None

        def native() -> tuple[Tensor, Tensor | None]:
            if recurrent_state is not None and length == 1:
                state = recurrent_state.clone()  # the kernel updates it in place
                out = hf_mamba.mamba2_selective_state_update(
                    state,
                    x[:, 0],
                    dt[:, 0, :, None].expand(-1, -1, head_dim),
                    A[:, None, None].expand(-1, head_dim, d_state),
                    B[:, 0],
                    C[:, 0],
                    None,
                    dt_softplus=False,
                )
                return out[:, None].float(), state.transpose(-1, -2)
            result = hf_mamba.mamba2_chunk_scan(
                x,
                dt,
                A,
                B,
                C,
                chunk_size=m.chunk_size,
                D=None,
                initial_states=recurrent_state,
                dt_softplus=False,
                return_final_states=cache is not None,
            )
            if cache is None:
                return result, None
            out, final = result
            return out, final.transpose(-1, -2)

        def factors() -> RecurrenceFactors:
            repeat = heads // groups
            return RecurrenceFactors(
                query=C.to(compute_dtype).repeat_interleave(repeat, dim=2),
                key=B.to(compute_dtype).repeat_interleave(repeat, dim=2),
                value=x.to(compute_dtype) * dt.to(compute_dtype)[..., None],
                log_decay=log_decay,
                erase=None,
            )

        initial = None if recurrent_state is None else recurrent_state.transpose(-1, -2)
        reads, final_state = self.recur(
            factors=factors,
            native=native if use_native else None,
            initial_state=initial,
            output_dtype=compute_dtype,
        )
        if cache is not None:
            store_state(cache, m.layer_idx, final_state.transpose(-1, -2).contiguous())

        skip = self.hook_skip(m.D.to(compute_dtype)[:, None] * x.to(compute_dtype))
        return self.hook_out(self.output(reads + skip, gate))

    def output(
        self, core_out: Float[Tensor, "batch pos head head_dim"], gate: Float[Tensor, "batch pos *gate"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The gated group norm of the reads (plus the D skip) and the output projection."""
        m = self.hf
        batch, length = core_out.shape[:2]
        normed = self.gated_norm(core_out.reshape(batch, length, -1), gate.reshape(batch, length, -1))
        return m.out_proj(normed.to(m.out_proj.weight.dtype))

    def output_inputs(self, activations: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
        return activations("hook_recurrence_out") + activations("hook_skip"), activations("hook_gate_input")
