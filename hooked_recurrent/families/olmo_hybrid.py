"""OLMo-Hybrid (``olmo_hybrid``): Gated DeltaNet layers with beta in [0, 2], and post-norm attention layers.

Its Gated DeltaNet has separate ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj`` and an
output gate ``g_proj``; with ``linear_allow_neg_eigval`` (the default) beta is ``2 sigmoid(b)``,
so the erase ``I - beta k k^T`` can flip the sign of the state along ``k``. Its Gated DeltaNet
layers are pre-norm (Qwen3.5's hook layout); its attention layers norm the outputs of attention and
MLP before adding them (`PostNormBlock`), and run unchanged (``attn.hook_out`` only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import OlmoHybridConfig
from transformers.models.olmo_hybrid import modeling_olmo_hybrid as hf_olmo

from ..blocks import BlockHooks, PreNormBlock, RunContext
from ..components import NormHooks, mlp_hooks
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.attention import AttentionOutputHooks
from ..mixers.gated_deltanet import DeltaRuleInputs, GatedDeltaNetMixer, delta_rule_step
from .base import ATTENTION, TINY, Family, base_config
from .qwen3_5 import GATED_DELTANET, qwen_linear_config

__all__ = ["OlmoHybridGatedDeltaNet", "PostNormBlock", "OlmoHybrid"]


class OlmoHybridGatedDeltaNet(GatedDeltaNetMixer):
    """OLMo-Hybrid's Gated DeltaNet: separate projections, ``beta = 2 sigmoid(b)`` by default."""

    chunk_kernel = staticmethod(hf_olmo.torch_chunk_gated_delta_rule)
    step_kernel = staticmethod(delta_rule_step)  # transformers' torch_recurrent_gated_delta_rule, leaner
    l2norm = staticmethod(hf_olmo.l2norm)
    output_norm_name, output_projection_name = "o_norm", "o_proj"

    def project(self, hidden_states: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        m = self.hf
        qkv = torch.cat([m.q_proj(hidden_states), m.k_proj(hidden_states), m.v_proj(hidden_states)], dim=-1)
        beta = m.b_proj(hidden_states).sigmoid()
        if m.allow_neg_eigval:
            beta = beta * 2.0
        a = m.a_proj(hidden_states).to(compute_dtype)
        log_decay = -m.A_log.to(compute_dtype).exp() * F.softplus(a + m.dt_bias)
        return DeltaRuleInputs(qkv=qkv, gate=m.g_proj(hidden_states), beta=beta, log_decay=log_decay)


class PostNormBlock(BlockHooks):
    """An OLMo attention layer: attention -> norm -> residual add, MLP -> norm -> residual add.

    Hook points: ``hook_resid_pre``, ``attn.hook_out``, ``ln1_post.hook_normalized``,
    ``hook_attn_out`` (the normed attention output, what is added to the residual stream), ``hook_resid_mid``, ``mlp.*``, ``ln2_post.hook_normalized``,
    ``hook_mlp_out`` (the normed MLP output), ``hook_resid_post``.
    """

    mixer_name = ATTENTION.container
    normed_outputs = True

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.attn = AttentionOutputHooks(hf_layer.self_attn)
        self.ln1_post = NormHooks(hf_layer.post_attention_layernorm)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_mid = HookPoint("batch pos d_model")
        self.mlp = mlp_hooks(hf_layer.mlp)
        self.ln2_post = NormHooks(hf_layer.post_feedforward_layernorm)
        self.hook_mlp_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        residual = self.enter(hidden_states)
        residual = self.hook_resid_mid(residual + self.hook_attn_out(self.ln1_post(self.attn(residual, **kwargs))))
        mlp_out = self.hook_mlp_out(self.ln2_post(self.mlp(residual)))
        return self.hook_resid_post(residual + mlp_out)


class OlmoHybrid(Family):
    """OLMo-Hybrid: pre-norm Gated DeltaNet layers and post-norm attention layers, SwiGLU MLPs."""

    name = "olmo_hybrid"
    hf_class_names = ("OlmoHybridForCausalLM",)
    layer_kinds = (GATED_DELTANET, ATTENTION)
    uses_position_ids = True
    example_hub_id = "allenai/Olmo-Hybrid-7B"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> BlockHooks:
        if hasattr(hf_layer, "linear_attn"):
            mixer = OlmoHybridGatedDeltaNet(hf_layer.linear_attn, context)
            return PreNormBlock(hf_layer, index, context, GATED_DELTANET.container, mixer)
        return PostNormBlock(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        return base_config(hf_model, model_name, tokenizer, d_mlp=c.intermediate_size, **qwen_linear_config(c))

    @classmethod
    def tiny_config(cls, **overrides: Any) -> OlmoHybridConfig:
        """4 layers (attention third), 2 key heads for 4 value heads, d_k != d_v, rotary attention."""
        params = dict(
            TINY,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=24,
            linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        params.update(overrides)
        return OlmoHybridConfig(**params)
