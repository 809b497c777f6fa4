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
from ..mixers.gated_deltanet import DeltaRuleInputs, GatedDeltaNetMixer, delta_rule_step
from .base import ATTENTION, TINY, Family, LayerKind, base_config

__all__ = ["GATED_DELTANET", "Qwen3_5GatedDeltaNet", "Qwen3_5", "qwen_linear_config", "QWEN_TINY", "TINY_MOE"]

GATED_DELTANET = LayerKind("gated_deltanet", "linear_attn", recurrent=True)


class Qwen3_5GatedDeltaNet(GatedDeltaNetMixer):
    """Qwen3.5's Gated DeltaNet (also Qwen3.5-MoE's): ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""

    chunk_kernel = staticmethod(hf_qwen.torch_chunk_gated_delta_rule)
    step_kernel = staticmethod(delta_rule_step)  # transformers' torch_recurrent_gated_delta_rule, leaner
    l2norm = staticmethod(hf_qwen.l2norm)

    def project(self, hidden_states: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        m = self.hf
        qkv, z = m.in_proj_qkv(hidden_states), m.in_proj_z(hidden_states)
        return self.gates(qkv, z, m.in_proj_b(hidden_states), m.in_proj_a(hidden_states), compute_dtype)

    def gates(self, qkv: Tensor, z: Tensor, b: Tensor, a: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        """The inputs from the projections: ``beta = sigmoid(b)``, ``g = -exp(A_log) softplus(a + dt_bias)``."""
        m = self.hf
        log_decay = -m.A_log.to(compute_dtype).exp() * F.softplus(a.to(compute_dtype) + m.dt_bias)
        return DeltaRuleInputs(qkv=qkv, gate=z, beta=b.sigmoid(), log_decay=log_decay)


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


# The tiny presets of the Qwen-style families: unequal key and value widths (16 and 24) and 2 key
# heads shared by 4 value heads make layout mistakes (transposed states, wrong head repetition)
# fail loudly in tests.
QWEN_TINY = dict(
    TINY,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_conv_kernel_dim=4,
)
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


class Qwen3_5(Family):
    """Qwen3.5: Gated DeltaNet layers mixed with gated attention, SwiGLU MLPs.

    Qwen3.5-MoE and Qwen3-Next subclass it: the same layers, other MLPs (and for Qwen3-Next other
    projections, `delta_rule`).
    """

    name = "qwen3.5"
    hf_class_names = ("Qwen3_5ForCausalLM",)
    multimodal_class_names = ("Qwen3_5ForConditionalGeneration",)
    layer_kinds = (GATED_DELTANET, ATTENTION)
    uses_position_ids = True
    example_hub_id = "Qwen/Qwen3.5-0.8B"
    delta_rule: type[GatedDeltaNetMixer] = Qwen3_5GatedDeltaNet

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> PreNormBlock:
        """A ``linear_attn`` (Gated DeltaNet) or gated ``self_attn`` layer, then its MLP."""
        if hf_layer.block_type == "linear_attention":
            mixer = cls.delta_rule(hf_layer.linear_attn, context)
            return PreNormBlock(hf_layer, index, context, GATED_DELTANET.container, mixer)
        return PreNormBlock(hf_layer, index, context, ATTENTION.container, GatedAttentionHooks(hf_layer.self_attn))

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config  # d_mlp: the dense MLPs' width (a config of MoE layers only has none)
        d_mlp = getattr(c, "intermediate_size", None)
        return base_config(hf_model, model_name, tokenizer, d_mlp=d_mlp, **qwen_linear_config(c))

    @classmethod
    def tiny_config(cls, **overrides: Any) -> Qwen3_5TextConfig:
        """4 layers: 3 Gated DeltaNet + 1 gated attention (see `QWEN_TINY`)."""
        params = {**QWEN_TINY, "intermediate_size": 128, "max_position_embeddings": 2048}
        return Qwen3_5TextConfig(**{**params, **overrides})
