"""Kimi Linear (``kimi_linear``): Kimi Delta Attention layers with a decay per key channel, and MLA layers.

Kimi Delta Attention is the delta rule of Gated DeltaNet with a diagonal decay,
``S_t = (I - beta_t k_t k_t^T) diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``, ``alpha_t`` of width
``d_k`` from a low-rank forget gate; its hooks are those of Gated DeltaNet (at
``blocks.{l}.linear_attn``), with ``hook_log_decay`` of shape ``[batch, pos, head, d_k]`` and
d_k = d_v. The attention layers are multi-head latent attention without positional encoding,
run unchanged (``attn.hook_out`` only); most MLPs are mixtures of experts (``hook_mlp_out`` only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import KimiLinearConfig
from transformers.models.kimi_linear import modeling_kimi_linear as hf_kimi

from ..blocks import PreNormBlock, RunContext
from ..config import HookedRecurrentConfig
from ..mixers.attention import AttentionOutputHooks
from ..mixers.gated_deltanet import DeltaRuleInputs, GatedDeltaNetMixer
from .base import ATTENTION, TINY, Family, LayerKind, base_config

__all__ = ["KIMI_DELTA", "KimiDeltaAttention", "KimiLinear"]

KIMI_DELTA = LayerKind("kimi_delta_attention", "linear_attn", recurrent=True)


class KimiDeltaAttention(GatedDeltaNetMixer):
    """Kimi Delta Attention: the delta rule with one decay per key channel."""

    chunk_kernel = staticmethod(hf_kimi.chunk_kimi_delta_attention)
    step_kernel = staticmethod(hf_kimi.recurrent_kimi_delta_attention)
    l2norm = staticmethod(hf_kimi.l2norm)
    output_norm_name, output_projection_name = "o_norm", "o_proj"
    per_channel_decay = True

    @staticmethod
    def dimensions(hf_module: nn.Module) -> tuple[int, int, int, int]:
        return hf_module.num_heads, hf_module.num_heads, hf_module.head_dim, hf_module.head_dim

    def project(self, hidden_states: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        m = self.hf
        return DeltaRuleInputs(
            qkv=torch.cat([m.q_proj(hidden_states), m.k_proj(hidden_states), m.v_proj(hidden_states)], dim=-1),
            gate=m.g_b_proj(m.g_a_proj(hidden_states)),
            beta=m.b_proj(hidden_states).sigmoid(),
            log_decay=m.forget_gate(hidden_states).to(compute_dtype),  # [batch, pos, head, d_k]
        )


class KimiLinear(Family):
    """Kimi Linear: Kimi Delta Attention and latent attention layers, MoE MLPs."""

    name = "kimi_linear"
    hf_class_names = ("KimiLinearForCausalLM",)
    layer_kinds = (KIMI_DELTA, ATTENTION)
    example_hub_id = "moonshotai/Kimi-Linear-48B-A3B-Instruct"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> PreNormBlock:
        if hf_layer.block_type == "linear_attention":
            mixer = KimiDeltaAttention(hf_layer.self_attn, context)
            return PreNormBlock(hf_layer, index, context, KIMI_DELTA.container, mixer)
        return PreNormBlock(hf_layer, index, context, ATTENTION.container, AttentionOutputHooks(hf_layer.self_attn))

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        kinds = {"linear_attention": KIMI_DELTA.name, "full_attention": ATTENTION.name}
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[kinds[t] for t in c.layer_types[: c.num_hidden_layers]],
            n_heads=c.linear_num_heads,
            d_k=c.linear_head_dim,
            d_v=c.linear_head_dim,
            n_key_heads=c.linear_num_heads,
            d_mlp=c.intermediate_size,
            n_attn_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads,
            conv_kernel=c.linear_conv_kernel_dim,
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> KimiLinearConfig:
        """4 layers (latent attention third), 4 delta heads of width 16; dense and MoE MLPs
        alternating (4 experts in 2 groups, top 2, and a shared expert)."""
        params = dict(
            TINY,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            linear_num_heads=4,
            linear_head_dim=16,
            linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        )
        params.update(overrides)
        return KimiLinearConfig(**params)
