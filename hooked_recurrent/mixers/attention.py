"""Attention layers with hook points.

`GatedAttentionHooks` recomputes the gated attention of the Qwen3.5 family (Qwen3.5, Qwen3.5-MoE,
Qwen3-Next) with hook points (at ``blocks.{l}.attn``)::

    hook_q            [batch, pos, head, d_head]       queries after q_norm and RoPE
    hook_k            [batch, pos, kv_head, d_head]    keys after k_norm and RoPE (the cache write)
    hook_v            [batch, pos, kv_head, d_head]    values (the cache write)
    hook_attn_scores  [batch, head, query_pos, key_pos]  scaled, masked scores (lazy)
    hook_pattern      [batch, head, query_pos, key_pos]  softmax pattern (lazy)
    hook_z            [batch, pos, head, d_head]       attention-weighted values, before the gate
    hook_gate         [batch, pos, head, d_head]       sigmoid output gate
    hook_out          [batch, pos, d_model]            output projection

The HF attention kernel (SDPA by default) computes the output unless the pattern matters to it:
``hook_attn_scores`` / ``hook_pattern`` are computed explicitly only when hooked, and their hooks
then change the output only if they edit (observing, e.g. caching, leaves every output bit for bit
as it was) or if a backward hook needs the pattern in the graph.

`AttentionOutputHooks` runs any other HF attention module as it is and hooks its output only
(``hook_out``): the attention layers of hybrid families whose attention is not recomputed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen

from ..components import output_bias
from ..hook_points import HookPoint, fire

__all__ = ["GatedAttentionHooks", "AttentionOutputHooks"]


class GatedAttentionHooks(nn.Module):
    """Hook points of one Qwen3.5-family attention layer; the block calls it in place of the HF module.

    Args:
        hf_module: The ``Qwen3_5Attention`` (or Qwen3.5-MoE / Qwen3-Next equivalent) it computes
            with (a plain reference, not re-registered).
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.hook_q = HookPoint("batch pos head d_head")
        self.hook_k = HookPoint("batch pos kv_head d_head")
        self.hook_v = HookPoint("batch pos kv_head d_head")
        self.hook_attn_scores = HookPoint("batch head query_pos key_pos")
        self.hook_pattern = HookPoint("batch head query_pos key_pos")
        self.hook_z = HookPoint("batch pos head d_head")
        self.hook_gate = HookPoint("batch pos head d_head")
        self.hook_out = HookPoint("batch pos d_model")

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        cache: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        """Same computation as ``Qwen3_5Attention.forward``, with hooks (its output only)."""
        m = self.hf
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, m.head_dim)
        query, gate = torch.chunk(m.q_proj(hidden_states).view(*input_shape, -1, m.head_dim * 2), 2, dim=-1)
        query = m.q_norm(query.reshape(hidden_shape)).transpose(1, 2)
        key = m.k_norm(m.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value = m.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = hf_qwen.apply_rotary_pos_emb(query, key, cos, sin)
        query = self.hook_q(query.transpose(1, 2)).transpose(1, 2)
        key = self.hook_k(key.transpose(1, 2)).transpose(1, 2)
        value = self.hook_v(value.transpose(1, 2)).transpose(1, 2)

        if cache is not None:
            key, value = cache.update(key, value, m.layer_idx, kwargs=kwargs)
        # A NaN or inf key or value would reach earlier queries through the masked products
        # (0 * NaN is NaN): attend over finite copies, then spoil what a causal loop would.
        bad = ~(torch.isfinite(key).all(-1) & torch.isfinite(value).all(-1)).any(1)  # [batch, kv_pos]
        if bool(bad.any()):
            key, value = key.masked_fill(bad[:, None, :, None], 0), value.masked_fill(bad[:, None, :, None], 0)
        else:
            bad = None

        z = None
        if any(p.has_fwd_hooks() or p.has_hooks(dir="bwd") for p in (self.hook_attn_scores, self.hook_pattern)):
            z = self._explicit_attention(query, key, value, attention_mask)
        if z is None:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(
                m.config._attn_implementation, hf_qwen.eager_attention_forward
            )
            z, _ = attention(
                m,
                query,
                key,
                value,
                attention_mask,
                dropout=0.0 if not m.training else m.attention_dropout,
                scaling=m.scaling,
                **kwargs,
            )
        if bad is not None:  # query t reads keys 0..t: spoiled from the first bad one on
            spoiled = bad.cummax(-1).values[:, -z.shape[1] :]
            z = z.masked_fill(spoiled[:, :, None, None], float("nan"))
        z = self.hook_z(z)  # [batch pos head d_head]
        gate = self.hook_gate(torch.sigmoid(gate))
        out = (z.reshape(*input_shape, -1) * gate.reshape(*input_shape, -1)).contiguous()
        return self.hook_out(m.o_proj(out))

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """The output projection per head, TransformerLens' ``W_O`` layout (gated values -> residual)."""
        weight = self.hf.o_proj.weight  # [d_model, heads * d_head], head-major columns
        return weight.T.reshape(-1, self.hf.head_dim, weight.shape[0])

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        """The output projection's bias (zeros when it has none)."""
        return output_bias(self.hf.o_proj)

    def head_results(self, activations: Callable[[str], Tensor]) -> Float[Tensor, "batch pos head d_model"]:
        """Each head's contribution to the residual stream in a cached run: its gated values times ``W_O[h]``.

        Args:
            activations: The cached activation of one of this layer's hooks, by its short name.
        """
        values = activations("hook_z") * activations("hook_gate")
        return torch.einsum("bphd,hdm->bphm", values.to(self.W_O.dtype), self.W_O)

    def _explicit_attention(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None
    ) -> Tensor | None:
        """Scores and pattern through their hooks; the output from them if it must come from them
        (a hook edited one, or a backward hook needs them in the graph), else None (the kernel's)."""
        m = self.hf
        key = hf_qwen.repeat_kv(key, m.num_key_value_groups)
        value = hf_qwen.repeat_kv(value, m.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * m.scaling
        scores, scores_edited = fire(self.hook_attn_scores, scores + _additive_mask(attention_mask, scores), 0)
        pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # SDPA with a boolean mask gives zero output for rows that may attend nowhere
            # (left-padded query positions); match it.
            pattern = pattern * attention_mask[..., : key.shape[2]].any(-1, keepdim=True)
        pattern, pattern_edited = fire(self.hook_pattern, pattern, 0)
        needs_graph = self.hook_attn_scores.has_hooks(dir="bwd") or self.hook_pattern.has_hooks(dir="bwd")
        if scores_edited is None and pattern_edited is None and not needs_graph:
            return None
        return torch.matmul(pattern, value).transpose(1, 2).contiguous()


class AttentionOutputHooks(nn.Module):
    """The output of an HF attention layer that runs unchanged (``hook_out`` only).

    Args:
        hf_module: The HF attention module (a plain reference, not re-registered).
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.hook_out = HookPoint("batch pos d_model")

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        """The HF module's output (without its attention weights), through ``hook_out``."""
        return self.hook_out(self.hf(hidden_states=hidden_states, **kwargs)[0])


def _additive_mask(mask: Tensor | None, scores: Tensor) -> Tensor:
    """Turn whatever mask the model built (None, bool or additive) into an additive mask."""
    q_len, kv_len = scores.shape[-2:]
    if mask is None:
        # Causal, with the queries being the last q_len of kv_len positions.
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
    if mask.dtype == torch.bool:
        blocked = torch.full((), torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        return torch.where(mask[..., :kv_len], scores.new_zeros(()), blocked)
    return mask[..., :kv_len].to(scores.dtype)
