"""NemotronH (``nemotron_h``): one token mixer per block — Mamba-2, attention, an MLP or a mixture of experts.

Every block is norm -> its one mixer -> residual add, and ``hook_attn_out`` is what it adds,
whichever its mixer. Layer kinds ``mamba2`` (hooks at ``blocks.{l}.mixer``, state
``[d_state, head_dim]``; transformers' ``NemotronHMamba2Mixer`` computes exactly Mamba-2's mixer),
``attention`` (``blocks.{l}.attn``), ``mlp`` and ``moe`` (``blocks.{l}.mlp``); attention, MLPs and
MoEs run unchanged, their output hooked (``hook_out``). No block has a second sublayer, so for
TransformerLens' decompositions the model is attention-only (``cfg.attn_only``): each block's
``attn_out`` is its one mixer's output.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import NemotronHConfig

from ..blocks import BlockHooks, RunContext
from ..components import MLPOutputHooks, NormHooks
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.attention import AttentionOutputHooks
from ..mixers.mamba2 import Mamba2Mixer
from .base import ATTENTION, TINY, Family, LayerKind, attention_fields, base_config
from .mamba2 import MAMBA2, mamba2_fields

__all__ = ["MLP", "MOE", "MLPMixerHooks", "NemotronHBlock", "NemotronH"]

MLP = LayerKind("mlp", "mlp", recurrent=False)
MOE = LayerKind("moe", "mlp", recurrent=False)

# transformers' block types -> layer kinds
KINDS = {"linear_attention": MAMBA2, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}


class MLPMixerHooks(MLPOutputHooks):
    """An MLP or a mixture of experts that is a block's one mixer: run unchanged, its output hooked."""

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__(hf_module)
        self.hook_out = HookPoint("batch pos d_model")

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_out(super().forward(x))


class NemotronHBlock(BlockHooks):
    """A NemotronH block: norm -> one mixer -> residual add.

    Hook points: ``hook_resid_pre``, ``ln1.hook_normalized``, the mixer's (``mixer.*`` for Mamba-2,
    ``attn.hook_out`` or ``mlp.hook_out``), ``hook_attn_out`` (what the block adds),
    ``hook_resid_post``.

    Args:
        hf_layer: The ``NemotronHBlock``.
        index: Its depth.
        context: The model's run context.
    """

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.kind = KINDS[hf_layer.block_type]
        self.mixer_name = self.kind.container
        self.ln1 = NormHooks(hf_layer.norm)
        if self.kind is MAMBA2:
            self.mixer = Mamba2Mixer(hf_layer.mixer, context)
        elif self.kind is ATTENTION:
            self.attn = AttentionOutputHooks(hf_layer.mixer)
        else:
            self.mlp = MLPMixerHooks(hf_layer.mixer)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = False,
        **kwargs: Any,
    ) -> Tensor:
        """Same computation as ``NemotronHBlock.forward``, with hooks."""
        residual = self.enter(hidden_states)
        normed = self.ln1(residual.to(dtype=self.hf.norm.weight.dtype))
        if self.kind is MAMBA2:
            mixed = self.mixer(normed, cache=cache, attention_mask=attention_mask, **kwargs)
        elif self.kind is ATTENTION:
            kwargs.update(position_ids=position_ids, use_cache=use_cache)
            mixed = self.attn(normed, cache=cache, attention_mask=attention_mask, **kwargs)
        else:
            mixed = self.mlp(normed)
        return self.hook_resid_post(residual + self.hook_attn_out(mixed))


class NemotronH(Family):
    """NemotronH: blocks of one mixer each (Mamba-2, attention, MLP or MoE)."""

    name = "nemotron_h"
    hf_class_names = ("NemotronHForCausalLM",)
    embedding_path, final_norm_path = "model.embeddings", "model.norm_f"
    layer_kinds = (MAMBA2, ATTENTION, MLP, MOE)
    example_hub_id = "nvidia/NVIDIA-Nemotron-Nano-9B-v2"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> NemotronHBlock:
        return NemotronHBlock(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        layers = cls.layers(hf_model)
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[KINDS[t].name for t in c.layers_block_type],
            d_mlp=c.intermediate_size if MLP.name in c.layers_block_type else None,
            **mamba2_fields(next(layer.mixer for layer in layers if layer.block_type == "linear_attention")),
            **attention_fields(c),
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> NemotronHConfig:
        """5 blocks (Mamba-2, Mamba-2, MoE, attention, MLP); 6 Mamba-2 heads in 2 groups, d_state 16,
        head_dim 8; 4 experts (top 2) and a shared expert."""
        params = dict(
            TINY,
            hidden_size=24,
            layers_block_type=["linear_attention", "linear_attention", "moe", "full_attention", "mlp"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=6,
            intermediate_size=48,
            mamba_num_heads=6,
            mamba_head_dim=8,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return NemotronHConfig(**params)
