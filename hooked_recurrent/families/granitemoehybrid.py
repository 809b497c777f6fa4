"""Granite 4 hybrid (``granitemoehybrid``): Mamba-2 and attention layers, a mixture of experts plus a
shared MLP in every layer, and muP multipliers.

Every layer is norm -> Mamba-2 or attention -> ``residual + residual_multiplier * out``, then norm
-> MoE + shared MLP -> ``residual + residual_multiplier * out``: the residual stream is not a sum of
its sublayers' outputs, so TransformerLens' decompositions say so (``additive_residual``). The embeddings are scaled by
``embedding_multiplier`` after ``hook_embed`` (``blocks.0.hook_resid_pre`` sees them scaled), and
the logits divided by ``logits_scaling`` (folded into ``model.W_U``). Layer kinds ``mamba2``
(``blocks.{l}.mixer``, state ``[d_state, head_dim]``; transformers' ``GraniteMoeHybridMambaLayer``
computes exactly Mamba-2's mixer) and ``attention`` (``blocks.{l}.attn``, run unchanged,
``hook_out`` only).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import GraniteMoeHybridConfig

from ..blocks import BlockHooks, RunContext
from ..components import MLPOutputHooks, NormHooks
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.attention import AttentionOutputHooks
from ..mixers.mamba2 import Mamba2Mixer
from .base import ATTENTION, TINY, Family, attention_fields, base_config
from .mamba2 import MAMBA2, mamba2_fields

__all__ = ["GraniteMoeHybridBlock", "GraniteMoeHybrid"]

KINDS = {"linear_attention": MAMBA2, "full_attention": ATTENTION}


class GraniteMoeHybridBlock(BlockHooks):
    """A Granite 4 hybrid layer, with its residual multiplier.

    Hook points: ``hook_resid_pre``, ``ln1.hook_normalized``, the mixer's (``mixer.*`` or
    ``attn.hook_out``), ``hook_attn_out`` (the mixer's output, before the multiplier),
    ``hook_resid_mid``, ``ln2.hook_normalized``, ``hook_mlp_out`` (MoE plus shared MLP, before the
    multiplier), ``hook_resid_post``.

    Args:
        hf_layer: The ``GraniteMoeHybridDecoderLayer``.
        index: Its depth.
        context: The model's run context.
    """

    additive_residual = False  # each sublayer's output is scaled before it is added

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.mixer_name = KINDS[hf_layer.block_type].container
        self.ln1 = NormHooks(hf_layer.input_layernorm)
        if hf_layer.mamba is not None:
            self.mixer = Mamba2Mixer(hf_layer.mamba, context)
        else:
            self.attn = AttentionOutputHooks(hf_layer.self_attn)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_mid = HookPoint("batch pos d_model")
        self.ln2 = NormHooks(hf_layer.post_attention_layernorm)
        if hf_layer.has_experts:
            self.moe = MLPOutputHooks(hf_layer.block_sparse_moe)
        self.shared_mlp = MLPOutputHooks(hf_layer.shared_mlp)
        self.hook_mlp_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(
        self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Same computation as ``GraniteMoeHybridDecoderLayer.forward``, with hooks."""
        multiplier = self.hf.residual_multiplier
        residual = self.enter(hidden_states)
        normed = self.ln1(residual)
        mixer = getattr(self, self.mixer_name)
        mixed = self.hook_attn_out(mixer(normed, cache=cache, attention_mask=attention_mask, **kwargs))
        residual = self.hook_resid_mid(residual + mixed * multiplier)
        normed = self.ln2(residual)
        mlp_out = self.shared_mlp(normed)
        if self.hf.has_experts:
            mlp_out = self.moe(normed) + mlp_out
        return self.hook_resid_post(residual + self.hook_mlp_out(mlp_out) * multiplier)


class GraniteMoeHybrid(Family):
    """Granite 4 hybrid: Mamba-2 and attention layers, MoE + shared MLP, muP multipliers."""

    name = "granitemoehybrid"
    hf_class_names = ("GraniteMoeHybridForCausalLM",)
    layer_kinds = (MAMBA2, ATTENTION)
    uses_position_ids = True
    example_hub_id = "ibm-granite/granite-4.0-h-tiny"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> GraniteMoeHybridBlock:
        return GraniteMoeHybridBlock(hf_layer, index, context)

    @classmethod
    def logit_multiplier(cls, config: Any) -> float:
        return 1.0 / config.logits_scaling

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        mamba = next(layer.mamba for layer in cls.layers(hf_model) if layer.mamba is not None)
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[KINDS[t].name for t in c.layers_block_type],
            d_mlp=c.shared_intermediate_size,
            **mamba2_fields(mamba),
            **attention_fields(c),
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> GraniteMoeHybridConfig:
        """3 layers (attention last) with rotary attention, 6 Mamba-2 heads in 2 groups, d_state 16,
        head_dim 8; 4 experts (top 2) and a shared MLP; every muP multiplier away from 1."""
        params = dict(
            TINY,
            hidden_size=24,
            intermediate_size=16,
            shared_intermediate_size=32,
            num_hidden_layers=3,
            layer_types=["linear_attention", "linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            position_embedding_type="rope",
            mamba_n_heads=6,
            mamba_d_head=8,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=3.0,
            residual_multiplier=0.7,
            attention_multiplier=0.3,
            logits_scaling=2.5,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return GraniteMoeHybridConfig(**params)
