"""Zamba2 (``zamba2``): Mamba-2 layers, some preceded by one shared transformer block reused at several depths.

A hybrid layer runs the shared block on the concatenation of its input and the original embeddings
(norm -> attention -> norm -> MLP, with per-use LoRA adapters), projects the result with its own
``linear`` and adds it to the input of its Mamba-2 layer. The shared block's modules (and
parameters) are the same at every depth that uses it; its hook points are one set per use, under
the using layer: ``blocks.{l}.shared_ln1``, ``blocks.{l}.attn.hook_out`` (run unchanged),
``blocks.{l}.shared_ln2``, ``blocks.{l}.hook_shared_mlp_out``, ``blocks.{l}.hook_shared_out``
(after ``linear``: what is added to the Mamba-2 input). Every layer is of kind ``mamba2``
(``blocks.{l}.mixer``, state ``[d_state, head_dim]``; transformers' ``Zamba2MambaMixer`` computes
exactly Mamba-2's mixer), and adds only the Mamba-2 output to the residual stream
(``hook_attn_out``): for TransformerLens' decompositions the model is attention-only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Zamba2Config

from ..blocks import BlockHooks, RunContext
from ..components import MLPOutputHooks, NormHooks
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.attention import AttentionOutputHooks
from ..mixers.mamba2 import Mamba2Mixer
from .base import TINY, Family, attention_fields, base_config
from .mamba2 import MAMBA2, mamba2_fields

__all__ = ["Zamba2Block", "Zamba2"]


class Zamba2Block(BlockHooks):
    """A Zamba2 layer: [the shared transformer block, added to the input,] norm -> Mamba-2 -> add.

    Args:
        hf_layer: The ``Zamba2MambaDecoderLayer`` or ``Zamba2HybridLayer`` at this depth.
        index: Its depth.
        context: The model's run context.
    """

    mixer_name = MAMBA2.container

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.hybrid = hasattr(hf_layer, "shared_transformer")
        if self.hybrid:
            shared = hf_layer.shared_transformer
            self.shared_ln1 = NormHooks(shared.input_layernorm)
            self.attn = AttentionOutputHooks(shared.self_attn)
            self.shared_ln2 = NormHooks(shared.pre_ff_layernorm)
            self.mlp = MLPOutputHooks(shared.feed_forward)
            self.hook_shared_mlp_out = HookPoint("batch pos d_model")
            self.hook_shared_out = HookPoint("batch pos d_model")
        mamba_layer = hf_layer.mamba_decoder if self.hybrid else hf_layer
        self.ln1 = NormHooks(mamba_layer.input_layernorm)
        self.mixer = Mamba2Mixer(mamba_layer.mamba, context)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(
        self,
        hidden_states: Tensor,
        original_hidden_states: Tensor | None = None,
        layer_idx: int | None = None,
        attention_mask: Tensor | None = None,
        causal_mask: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        """Same computation as the HF layer's forward (same positional arguments), with hooks."""
        residual = self.enter(hidden_states)
        mamba_in = residual
        if self.hybrid:
            shared_in = self.shared_ln1(torch.concatenate([residual, original_hidden_states], dim=-1))
            attended = self.attn(shared_in, layer_idx=layer_idx, attention_mask=causal_mask, cache=cache, **kwargs)
            mlp_out = self.hook_shared_mlp_out(self.mlp(self.shared_ln2(attended), layer_idx))
            mamba_in = residual + self.hook_shared_out(self.hf.linear(mlp_out))
        mixed = self.mixer(self.ln1(mamba_in), cache=cache, attention_mask=attention_mask, **kwargs)
        mixed = self.hook_attn_out(mixed)
        return self.hook_resid_post(residual + mixed)


class Zamba2(Family):
    """Zamba2: Mamba-2 layers and a shared transformer block used at several depths."""

    name = "zamba2"
    hf_class_names = ("Zamba2ForCausalLM",)
    final_norm_path = "model.final_layernorm"
    layer_kinds = (MAMBA2,)
    uses_position_ids = True
    example_hub_id = "Zyphra/Zamba2-1.2B"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> Zamba2Block:
        return Zamba2Block(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        first = cls.layers(hf_model)[0]
        mamba = (first.mamba_decoder if hasattr(first, "mamba_decoder") else first).mamba
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[MAMBA2.name] * c.num_hidden_layers,
            d_mlp=c.intermediate_size,
            **mamba2_fields(mamba),
            **attention_fields(c),
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> Zamba2Config:
        """3 layers, the shared block (rotary attention, per-use adapters) used at depths 1 and 2;
        6 Mamba-2 heads in 2 groups, d_state 16, head_dim 8.

        Tied embeddings: transformers ties the uses of the shared block to one set of parameters
        only when it ties the embeddings (as Zamba2Config does by default).
        """
        params = dict(
            TINY,
            tie_word_embeddings=True,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=3,
            layers_block_type=["linear_attention", "hybrid", "hybrid"],
            num_attention_heads=4,  # as many key/value heads (transformers' adapters assume it)
            num_mem_blocks=1,
            use_shared_attention_adapter=True,
            adapter_rank=4,
            use_mem_rope=True,
            n_mamba_heads=6,
            mamba_d_state=16,
            mamba_ngroups=2,
            mamba_d_conv=4,
            chunk_size=32,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return Zamba2Config(**params)
