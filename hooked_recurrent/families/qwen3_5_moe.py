"""Qwen3.5-MoE (``qwen3_5_moe``): Qwen3.5's Gated DeltaNet and gated attention with MoE MLPs.

Hub checkpoints are multimodal (``Qwen3_5MoeForConditionalGeneration``, e.g.
``Qwen/Qwen3.5-35B-A3B``) and load as their text model. Layer kinds and hook points are Qwen3.5's;
the MoE MLPs run unchanged (``hook_mlp_out`` only).
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3_5MoeTextConfig

from .qwen3_5 import QWEN_TINY, TINY_MOE, Qwen3_5

__all__ = ["Qwen3_5Moe"]


class Qwen3_5Moe(Qwen3_5):
    """Qwen3.5-MoE: Qwen3.5's mixers, a mixture of experts with a shared expert in every layer."""

    name = "qwen3_5_moe"
    hf_class_names = ("Qwen3_5MoeForCausalLM",)
    multimodal_class_names = ("Qwen3_5MoeForConditionalGeneration",)
    example_hub_id = "Qwen/Qwen3.5-35B-A3B"

    @classmethod
    def tiny_config(cls, **overrides: Any) -> Qwen3_5MoeTextConfig:
        """Qwen3.5's tiny layers with 4 experts (top 2) and a shared expert."""
        return Qwen3_5MoeTextConfig(**{**QWEN_TINY, **TINY_MOE, **overrides})
