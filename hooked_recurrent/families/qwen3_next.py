"""Qwen3-Next (``qwen3_next``): Gated DeltaNet and gated attention, mixtures of experts with a shared expert.

Its Gated DeltaNet fuses the projections per key head (``in_proj_qkvz``, ``in_proj_ba``, each key
head's queries, keys, values and gates side by side); everything else is Qwen3.5's. Layer kinds
and hook points are Qwen3.5's; MoE layers run unchanged (``hook_mlp_out`` only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from ..mixers.gated_deltanet import DeltaRuleInputs, delta_rule_step
from .qwen3_5 import QWEN_TINY, TINY_MOE, Qwen3_5, Qwen3_5GatedDeltaNet

__all__ = ["Qwen3NextGatedDeltaNet", "Qwen3Next"]


class Qwen3NextGatedDeltaNet(Qwen3_5GatedDeltaNet):
    """Qwen3-Next's Gated DeltaNet: projections fused per key head."""

    chunk_kernel = staticmethod(hf_next.torch_chunk_gated_delta_rule)
    step_kernel = staticmethod(delta_rule_step)  # transformers' torch_recurrent_gated_delta_rule, leaner
    l2norm = staticmethod(hf_next.l2norm)

    def project(self, hidden_states: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        m = self.hf
        q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(hidden_states), m.in_proj_ba(hidden_states))
        qkv = torch.cat([x.flatten(2) for x in (q, k, v)], dim=-1)
        return self.gates(qkv, z.flatten(2), b, a, compute_dtype)


class Qwen3Next(Qwen3_5):
    """Qwen3-Next: Gated DeltaNet (fused projections) and gated attention, MoE MLPs."""

    name = "qwen3_next"
    hf_class_names = ("Qwen3NextForCausalLM",)
    multimodal_class_names = ()
    example_hub_id = "Qwen/Qwen3-Next-80B-A3B-Instruct"
    delta_rule = Qwen3NextGatedDeltaNet

    @classmethod
    def tiny_config(cls, **overrides: Any) -> Qwen3NextConfig:
        """Qwen3.5's tiny layers; every second layer a mixture of 4 experts (top 2) with a shared
        expert, the others dense."""
        params = {**QWEN_TINY, **TINY_MOE, "intermediate_size": 96, "decoder_sparse_step": 2}
        return Qwen3NextConfig(**{**params, **overrides})
