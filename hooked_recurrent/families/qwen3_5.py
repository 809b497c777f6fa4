"""Qwen3.5 (``qwen3_5``): Gated DeltaNet layers mixed with gated attention, SwiGLU MLPs.

Layer kinds: ``gated_deltanet`` (hooks at ``blocks.{l}.linear_attn``, state ``[d_k, d_v]``, as
transformers stores it) and ``attention`` (``blocks.{l}.attn``). The multimodal checkpoints
(``Qwen3_5ForConditionalGeneration``, e.g. ``Qwen/Qwen3.5-0.8B``) load as their text model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen

from ..blocks import PreNormBlock, RunContext
from ..config import HookedRecurrentConfig
from ..mixers.attention import GatedAttentionHooks
from ..mixers.gated_deltanet import DeltaRuleInputs, GatedDeltaNetMixer
from .base import ATTENTION, TINY, Family, LayerKind, base_config

__all__ = ["GATED_DELTANET", "Qwen3_5GatedDeltaNet", "Qwen3_5", "qwen_block"]

GATED_DELTANET = LayerKind("gated_deltanet", "linear_attn", recurrent=True)


class Qwen3_5GatedDeltaNet(GatedDeltaNetMixer):
    """Qwen3.5's Gated DeltaNet: separate ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""

    chunk_kernel = staticmethod(hf_qwen.torch_chunk_gated_delta_rule)
    step_kernel = staticmethod(hf_qwen.torch_recurrent_gated_delta_rule)
    l2norm = staticmethod(hf_qwen.l2norm)

    def __init__(self, hf_module: nn.Module, context: RunContext | None = None) -> None:
        m = hf_module
        super().__init__(
            m, context, n_heads=m.num_v_heads, n_key_heads=m.num_k_heads, d_k=m.head_k_dim, d_v=m.head_v_dim
        )

    @property
    def output_projection(self) -> nn.Linear:
        return self.hf.out_proj

    def project(self, hidden_states: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        m = self.hf
        a = m.in_proj_a(hidden_states).to(compute_dtype)
        return DeltaRuleInputs(
            qkv=m.in_proj_qkv(hidden_states),
            gate=m.in_proj_z(hidden_states),
            beta=m.in_proj_b(hidden_states).sigmoid(),
            log_decay=-m.A_log.to(compute_dtype).exp() * F.softplus(a + m.dt_bias),
        )

    def output(self, core_out: Tensor, gate: Tensor) -> Tensor:
        m = self.hf
        batch, length = core_out.shape[:2]
        normed = m.norm(core_out.reshape(-1, self.d_v), gate.reshape(-1, self.d_v))
        return m.out_proj(normed.reshape(batch, length, -1))


def qwen_block(
    hf_layer: nn.Module, index: int, context: RunContext, recurrent: type[GatedDeltaNetMixer]
) -> PreNormBlock:
    """A Qwen-style layer: ``linear_attn`` (a delta-rule mixer) or gated ``self_attn``, then the MLP."""
    if hf_layer.block_type == "linear_attention":
        return PreNormBlock(hf_layer, index, context, GATED_DELTANET.container, recurrent(hf_layer.linear_attn, context))
    return PreNormBlock(hf_layer, index, context, ATTENTION.container, GatedAttentionHooks(hf_layer.self_attn))


def qwen_linear_config(c: Any) -> dict[str, Any]:
    """The `HookedRecurrentConfig` fields of a Qwen-style config with Gated DeltaNet layers."""
    kinds = {"linear_attention": GATED_DELTANET.name, "full_attention": ATTENTION.name}
    return dict(
        layer_types=[kinds[t] for t in c.layer_types[: c.num_hidden_layers]],
        n_heads=c.linear_num_value_heads,
        d_k=c.linear_key_head_dim,
        d_v=c.linear_value_head_dim,
        n_key_heads=c.linear_num_key_heads,
        n_attn_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        d_head=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        conv_kernel=c.linear_conv_kernel_dim,
    )


class Qwen3_5(Family):
    """Qwen3.5: Gated DeltaNet layers mixed with gated attention, SwiGLU MLPs."""

    name = "qwen3.5"
    hf_class_names = ("Qwen3_5ForCausalLM",)
    multimodal_class_names = ("Qwen3_5ForConditionalGeneration",)
    layer_kinds = (GATED_DELTANET, ATTENTION)
    uses_position_ids = True
    example_hub_id = "Qwen/Qwen3.5-0.8B"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> PreNormBlock:
        return qwen_block(hf_layer, index, context, Qwen3_5GatedDeltaNet)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        return base_config(hf_model, model_name, tokenizer, d_mlp=c.intermediate_size, **qwen_linear_config(c))

    @classmethod
    def tiny_config(cls, **overrides: Any) -> Qwen3_5TextConfig:
        """A 4-layer Qwen3.5 (3 Gated DeltaNet + 1 gated attention) with d_k != d_v.

        Unequal key and value widths (16 and 24) and 2 key heads shared by 4 value heads make
        layout mistakes (transposed states, wrong head repetition) fail loudly in tests.
        """
        params = dict(
            TINY,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=24,
            linear_conv_kernel_dim=4,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return Qwen3_5TextConfig(**params)
