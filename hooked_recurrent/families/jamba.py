"""Jamba (``jamba``): Mamba-1 layers mixed with attention, a SwiGLU MLP or a mixture of experts in every layer.

Layer kinds ``mamba1`` (hooks at ``blocks.{l}.mixer``; each of the layer's channels is a head with
``d_k = d_state`` and ``d_v = 1``, its state ``[d_state, 1]`` the HF state of that channel, see
`hooked_recurrent.mixers.mamba1`) and ``attention`` (``blocks.{l}.attn``, run unchanged,
``hook_out`` only). Jamba norms the Mamba-1 time step, ``B`` and ``C`` (``hook_B`` and ``hook_C``
carry them normed).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import JambaConfig, PreTrainedModel

from ..blocks import PreNormBlock, RunContext
from ..config import HookedRecurrentConfig
from ..mixers.attention import AttentionOutputHooks
from ..mixers.mamba1 import Mamba1Mixer
from .base import ATTENTION, TINY, Family, LayerKind, attention_fields, base_config

__all__ = ["MAMBA1", "JambaMamba1Mixer", "Jamba"]

MAMBA1 = LayerKind("mamba1", "mixer", recurrent=True, state_layout="key")


class JambaMamba1Mixer(Mamba1Mixer):
    """Jamba's Mamba-1: RMSNorms on the time step, ``B`` and ``C``."""

    def selective_inputs(
        self, x: Float[Tensor, "batch pos channel"]
    ) -> tuple[Float[Tensor, "batch pos rank"], Float[Tensor, "batch pos d_state"], Float[Tensor, "batch pos d_state"]]:
        m = self.hf
        time_step, B, C = super().selective_inputs(x)
        return m.dt_layernorm(time_step), m.b_layernorm(B), m.c_layernorm(C)


class Jamba(Family):
    """Jamba: Mamba-1 and attention layers, each followed by an MLP or a mixture of experts."""

    name = "jamba"
    hf_class_names = ("JambaForCausalLM",)
    final_norm_path = "model.final_layernorm"
    layer_kinds = (MAMBA1, ATTENTION)
    example_hub_id = "ai21labs/AI21-Jamba-Reasoning-3B"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> PreNormBlock:
        if hasattr(hf_layer, "mamba"):
            kind, mixer = MAMBA1, JambaMamba1Mixer(hf_layer.mamba, context)
        else:
            kind, mixer = ATTENTION, AttentionOutputHooks(hf_layer.self_attn)
        return PreNormBlock(
            hf_layer, index, context, kind.container, mixer, norm2="pre_ff_layernorm", mlp="feed_forward"
        )

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        kinds = {"mamba": MAMBA1.name, "attention": ATTENTION.name}
        mamba = next(layer.mamba for layer in cls.layers(hf_model) if hasattr(layer, "mamba"))
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[kinds[t] for t in c.layers_block_type],
            n_heads=mamba.intermediate_size,
            d_k=mamba.ssm_state_size,
            d_v=1,
            n_groups=1,
            conv_kernel=mamba.conv_kernel_size,
            d_mlp=c.intermediate_size,
            **attention_fields(c),
        )

    @classmethod
    def randomise(cls, model: PreTrainedModel, generator: torch.Generator) -> None:
        """Rates ``A`` of 0.002..0.5 per channel and state, and random time-step biases, so that
        states carry information across many positions (transformers' init forgets within a few)."""
        super().randomise(model, generator)
        for module in model.modules():
            if type(module).__name__ == "JambaMambaMixer":
                with torch.no_grad():
                    rates = torch.empty(module.A_log.shape).uniform_(0.002, 0.5, generator=generator)
                    module.A_log.copy_(rates.log())
                    module.dt_proj.bias.copy_(torch.randn(module.dt_proj.bias.shape, generator=generator) * 0.5)

    @classmethod
    def tiny_config(cls, **overrides: Any) -> JambaConfig:
        """3 layers (attention last, experts in the second); 80 channels (so per-head hook points
        are built on first use) with d_state 8."""
        params = dict(
            TINY,
            hidden_size=40,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_layer_period=3,
            attn_layer_offset=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return JambaConfig(**params)
