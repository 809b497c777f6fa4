"""Bamba (``bamba``): Mamba-2 layers mixed with attention, a SwiGLU ``feed_forward`` MLP in every layer.

Layer kinds ``mamba2`` (hooks at ``blocks.{l}.mixer``, state ``[d_state, head_dim]``, the transpose
of transformers' storage; transformers' ``BambaMixer`` computes exactly Mamba-2's mixer) and
``attention`` (``blocks.{l}.attn``, run unchanged, ``hook_out`` only).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import BambaConfig

from ..blocks import PreNormBlock, RunContext
from ..config import HookedRecurrentConfig
from ..mixers.attention import AttentionOutputHooks
from ..mixers.mamba2 import Mamba2Mixer
from .base import ATTENTION, TINY, Family, attention_fields, base_config
from .mamba2 import MAMBA2, mamba2_fields

__all__ = ["BambaBlock", "Bamba"]


class BambaBlock(PreNormBlock):
    """A Bamba layer: norm -> Mamba-2 or attention -> add, norm -> ``feed_forward`` -> add.

    Args:
        hf_layer: The ``BambaDecoderLayer``.
        index: Its depth.
        context: The model's run context.
    """

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        if hf_layer.block_type == "linear_attention":
            kind, mixer = MAMBA2, Mamba2Mixer(hf_layer.mamba, context)
        else:
            kind, mixer = ATTENTION, AttentionOutputHooks(hf_layer.self_attn)
        super().__init__(hf_layer, index, context, kind.container, mixer, norm2="pre_ff_layernorm", mlp="feed_forward")

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> tuple[Tensor, None]:
        """The layer's output, and no attention weights (the HF layer returns both)."""
        return super().forward(hidden_states, **kwargs), None

    def passed_through(self, hidden_states: Tensor) -> tuple[Tensor, None]:
        return hidden_states, None


class Bamba(Family):
    """Bamba: Mamba-2 and attention layers, each followed by a SwiGLU MLP."""

    name = "bamba"
    hf_class_names = ("BambaForCausalLM",)
    final_norm_path = "model.final_layernorm"
    layer_kinds = (MAMBA2, ATTENTION)
    uses_position_ids = True
    example_hub_id = "ibm-ai-platform/Bamba-9B-v2"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> BambaBlock:
        return BambaBlock(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        kinds = {"linear_attention": MAMBA2.name, "full_attention": ATTENTION.name}
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[kinds[t] for t in c.layers_block_type],
            d_mlp=c.intermediate_size,
            **mamba2_fields(next(layer.mamba for layer in cls.layers(hf_model) if hasattr(layer, "mamba"))),
            **attention_fields(c),
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> BambaConfig:
        """3 layers (attention last), 6 Mamba-2 heads in 2 groups, d_state (16) != head_dim (8)."""
        params = dict(
            TINY,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=3,
            attn_layer_indices=[2],
            num_attention_heads=4,
            num_key_value_heads=2,
            mamba_n_heads=6,
            mamba_d_head=8,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=32,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return BambaConfig(**params)
