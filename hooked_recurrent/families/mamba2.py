"""Mamba-2 (``mamba2``): every block is norm -> SSD mixer -> residual add, no MLP.

Layer kind ``mamba2`` (hooks at ``blocks.{l}.mixer``): states are hooked as ``[d_state, head_dim]``,
the transpose of transformers' storage. Checkpoints in the original mamba_ssm format are converted
on loading (`hooked_recurrent.loading.mamba_ssm`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Mamba2Config

from ..blocks import BlockHooks, RunContext
from ..components import NormHooks
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.mamba2 import Mamba2Mixer
from .base import TINY, Family, LayerKind, base_config

__all__ = ["MAMBA2", "Mamba2Block", "Mamba2", "mamba2_fields"]

MAMBA2 = LayerKind("mamba2", "mixer", recurrent=True, state_layout="value_key")


def mamba2_fields(hf_mixer: nn.Module) -> dict[str, Any]:
    """The `HookedRecurrentConfig` fields of a transformers Mamba-2 mixer (every host's mixer has
    these attributes: Mamba-2, Bamba, NemotronH, Granite 4, Falcon-H1, Zamba2)."""
    m = hf_mixer
    return dict(
        n_heads=m.num_heads, d_k=m.ssm_state_size, d_v=m.head_dim, n_groups=m.n_groups, conv_kernel=m.conv_kernel_size
    )


class Mamba2Block(BlockHooks):
    """Hook points of one Mamba-2 block (norm, mixer, residual add; no MLP).

    Args:
        hf_layer: The ``Mamba2Block``.
        index: Its depth.
        context: The model's run context.
    """

    mixer_name = MAMBA2.container

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.ln1 = NormHooks(hf_layer.norm)
        self.mixer = Mamba2Mixer(hf_layer.mixer, context)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Same computation as ``Mamba2Block.forward``, with hooks."""
        layer = self.hf
        residual = self.enter(hidden_states)
        normed = self.ln1(residual.to(dtype=layer.norm.weight.dtype))
        if layer.residual_in_fp32:
            residual = residual.to(torch.float32)
        mixed = self.hook_attn_out(self.mixer(normed, cache=cache, attention_mask=attention_mask))
        return self.hook_resid_post(residual + mixed)


class Mamba2(Family):
    """Mamba-2: every block is norm -> SSD mixer -> residual add."""

    name = "mamba2"
    hf_class_names = ("Mamba2ForCausalLM",)
    embedding_path, layers_path, final_norm_path = "backbone.embeddings", "backbone.layers", "backbone.norm_f"
    layer_kinds = (MAMBA2,)
    example_hub_id = "state-spaces/mamba2-370m"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> Mamba2Block:
        return Mamba2Block(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        layer_types = [MAMBA2.name] * hf_model.config.num_hidden_layers
        mixer_fields = mamba2_fields(cls.layers(hf_model)[0].mixer)
        return base_config(hf_model, model_name, tokenizer, layer_types=layer_types, **mixer_fields)

    @classmethod
    def tiny_config(cls, **overrides: Any) -> Mamba2Config:
        """A 3-layer Mamba-2 with d_state (16) != head_dim (12) and 2 groups of 3 heads.

        A chunk size of 32 makes 150-token tests span several chunks of the SSD kernel.
        """
        params = dict(
            TINY,
            hidden_size=36,
            expand=2,
            num_heads=6,
            head_dim=12,
            state_size=16,
            n_groups=2,
            num_hidden_layers=3,
            conv_kernel=4,
            chunk_size=32,
        )
        params.update(overrides)
        return Mamba2Config(**params)
