"""Gated DeltaNet (the linear-attention layers of Qwen3.5) with hook points.

Hook points, in execution order (at ``blocks.{l}.linear_attn``)::

    hook_q_pre_conv      [batch, pos, key_head, d_k]   query projection before the short conv
    hook_k_pre_conv      [batch, pos, key_head, d_k]
    hook_v_pre_conv      [batch, pos, head, d_v]
    hook_gate_input      [batch, pos, head, d_v]       z, the output gate's input
    hook_q               [batch, pos, key_head, d_k]   after conv + SiLU, before L2 norm
    hook_k               [batch, pos, key_head, d_k]
    hook_v               [batch, pos, head, d_v]
    hook_beta            [batch, pos, head]            write strength sigmoid(b)
    hook_log_decay       [batch, pos, head]            g = log alpha (<= 0)
    hook_write_key       [batch, pos, head, d_k]       k_t, L2-normalised (repeated to value heads)
    hook_write_value     [batch, pos, head, d_v]       beta_t v_t
    hook_read_query      [batch, pos, head, d_k]       q_t, L2-normalised, times d_k^-1/2
    hook_write           [batch, pos, head, d_k, d_v]  beta_t k_t v_t^T (lazy)
    heads.{h}.hook_write [batch, pos, d_k, d_v]        one head's write (lazy)
    hook_state           [batch, pos, head, d_k, d_v]  S_t after the write (lazy)
    heads.{h}.hook_state [batch, pos, d_k, d_v]
    hook_recurrence_out  [batch, pos, head, d_v]       o_t = S_t^T q_t, before the gated norm
    hook_out             [batch, pos, d_model]         the layer's output projection

The recurrence is ``S_t = alpha_t (S_{t-1} - beta_t k_t k_t^T S_{t-1}) + beta_t k_t v_t^T``. The
write hooks carry the paper's native write ``beta_t k_t v_t^T``; transformers computes the equal
``k_t (beta_t (v_t - alpha_t S_{t-1}^T k_t))^T``, whose erase part belongs to the decay map here.
Factor, write and state tensors are float32 (float64 for float64 models), as in the kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen

from ..hook_points import HookPoint
from .base import MatrixRecurrentMixer, RecurrenceFactors

__all__ = ["GatedDeltaNetHooks"]


class GatedDeltaNetHooks(MatrixRecurrentMixer):
    """Hook points of one Qwen3.5 Gated DeltaNet layer; its forward replaces the HF module's.

    Args:
        hf_module: The ``Qwen3_5GatedDeltaNet`` it hooks (kept, not copied, not re-registered).
        context: The model's `RunContext`.
    """

    def __init__(self, hf_module: torch.nn.Module, context: Any = None) -> None:
        super().__init__(hf_module.num_v_heads, hf_module.head_k_dim, hf_module.head_v_dim)
        self.__dict__["hf"] = hf_module  # a plain reference: parameters stay at their HF path
        self.__dict__["context"] = context
        self.hook_q_pre_conv = HookPoint("batch pos key_head d_k")
        self.hook_k_pre_conv = HookPoint("batch pos key_head d_k")
        self.hook_v_pre_conv = HookPoint("batch pos head d_v")
        self.hook_gate_input = HookPoint("batch pos head d_v")
        self.hook_q = HookPoint("batch pos key_head d_k")
        self.hook_k = HookPoint("batch pos key_head d_k")
        self.hook_v = HookPoint("batch pos head d_v")
        self.hook_beta = HookPoint("batch pos head")
        self.hook_out = HookPoint("batch pos d_model")

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Same computation and cache updates as ``Qwen3_5GatedDeltaNet.forward``, with hooks."""
        m = self.hf
        attention_mask = self.padding_mask(attention_mask)
        hidden_states = hf_qwen.apply_mask_to_padding_states(hidden_states, attention_mask)
        batch, length, _ = hidden_states.shape
        if cache is not None:
            conv_state = cache.get_conv_state(m.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(m.layer_idx, state_idx=0)
        else:
            conv_state, recurrent_state = None, None

        mixed_qkv = self._pre_conv_hooks(m.in_proj_qkv(hidden_states), batch, length)
        z = self.hook_gate_input(m.in_proj_z(hidden_states).reshape(batch, length, -1, m.head_v_dim))
        b = m.in_proj_b(hidden_states)
        a = m.in_proj_a(hidden_states)

        mixed_qkv = mixed_qkv.transpose(1, 2)
        if conv_state is not None and length == 1 and not cache.is_recording_past(m.layer_idx):
            mixed_qkv = hf_qwen.causal_conv1d_update(
                mixed_qkv, conv_state, m.conv1d.weight.squeeze(1), m.conv1d.bias, m.activation
            )
        else:
            if cache is not None:
                mixed_qkv = cache.update_conv_state(mixed_qkv, m.layer_idx, conv_kernel_size=m.conv_kernel_size)
            mixed_qkv = hf_qwen.causal_conv1d_fn(
                mixed_qkv, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation, **kwargs
            )
            if cache is not None:
                mixed_qkv = mixed_qkv[:, :, -length:]
        mixed_qkv = mixed_qkv.transpose(1, 2)
        query, key, value = torch.split(mixed_qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
        query = self.hook_q(query.reshape(batch, length, -1, m.head_k_dim))
        key = self.hook_k(key.reshape(batch, length, -1, m.head_k_dim))
        value = self.hook_v(value.reshape(batch, length, -1, m.head_v_dim))

        # float32 like the kernels, except for float64 models (exact checks).
        compute_dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        beta = self.hook_beta(b.sigmoid())
        g = self.hook_log_decay(-m.A_log.to(compute_dtype).exp() * F.softplus(a.to(compute_dtype) + m.dt_bias))
        cu_seqlens = kwargs.pop("cu_seq_lens_q", None)

        def native() -> tuple[Tensor, Tensor | None]:
            kernel = (
                hf_qwen.torch_recurrent_gated_delta_rule
                if recurrent_state is not None and length == 1
                else hf_qwen.torch_chunk_gated_delta_rule
            )
            return kernel(
                query,
                key,
                value,
                g=g,
                beta=beta,
                initial_state=recurrent_state,
                output_final_state=cache is not None,
                use_qk_l2norm_in_kernel=True,
                cu_seqlens=cu_seqlens,
                **kwargs,
            )

        def factors() -> RecurrenceFactors:
            # The same normalisation, repetition and scaling the kernels apply internally.
            repeat = m.num_v_heads // m.num_k_heads
            q_hat = hf_qwen.l2norm(query.to(compute_dtype), dim=-1, eps=1e-6)
            k_hat = hf_qwen.l2norm(key.to(compute_dtype), dim=-1, eps=1e-6)
            if repeat > 1:
                q_hat = q_hat.repeat_interleave(repeat, dim=2)
                k_hat = k_hat.repeat_interleave(repeat, dim=2)
            beta_c = beta.to(compute_dtype)
            return RecurrenceFactors(
                query=q_hat * m.head_k_dim**-0.5,
                key=k_hat,
                value=value.to(compute_dtype) * beta_c[..., None],
                log_decay=g.to(compute_dtype),
                erase=beta_c,
            )

        core_out, final_state = self.recur(
            factors=factors,
            native=None if compute_dtype == torch.float64 else native,
            initial_state=recurrent_state,
            output_dtype=query.dtype,
        )
        if cache is not None:
            cache.update_recurrent_state(final_state, m.layer_idx)

        core_out = m.norm(core_out.reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim))
        return self.hook_out(m.out_proj(core_out.reshape(batch, length, -1)))

    def _pre_conv_hooks(self, mixed_qkv: Tensor, batch: int, length: int) -> Tensor:
        """Fire the pre-conv hooks (only splitting the projection when one is attached)."""
        points = (self.hook_q_pre_conv, self.hook_k_pre_conv, self.hook_v_pre_conv)
        if not any(p.has_fwd_hooks() for p in points):
            return mixed_qkv
        m = self.hf
        q, k, v = torch.split(mixed_qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
        q = self.hook_q_pre_conv(q.reshape(batch, length, -1, m.head_k_dim))
        k = self.hook_k_pre_conv(k.reshape(batch, length, -1, m.head_k_dim))
        v = self.hook_v_pre_conv(v.reshape(batch, length, -1, m.head_v_dim))
        return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
