"""Falcon-H1 (``falcon_h1``): Mamba-2 and attention side by side in every layer, with muP multipliers.

Every layer norms its input once and feeds it to both mixers: ``residual + ssm_out_multiplier *
mamba(x) + attention_out_multiplier * attention(attention_in_multiplier * x)``, then norm -> SwiGLU
MLP (with its own multipliers) -> add. The Mamba-2 mixer scales its input by
``ssm_in_multiplier`` and each part of its projection by a muP vector, and gates its output with
an RMSNorm or with ``silu(z)`` alone (``mamba_rms_norm``). The embeddings are scaled after
``hook_embed``, the logits by ``lm_head_multiplier`` (folded into ``model.W_U``).

Every layer is of kind ``mamba2`` (``blocks.{l}.mixer``, state ``[d_state, head_dim]``) and also has
an attention container ``blocks.{l}.attn`` (run unchanged, ``hook_out`` only); transformers caches
both in one hybrid cache layer, which `RecurrentCache` handles as such. What a layer adds is the
two mixers' outputs, each times its multiplier, so the residual stream is not a sum of the mixers'
outputs and TransformerLens' decompositions say so (``additive_residual``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformers import FalconH1Config

from ..blocks import BlockHooks, RunContext
from ..components import GatedMLPHooks, NormHooks, output_bias
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.attention import AttentionOutputHooks
from ..mixers.mamba2 import Mamba2Mixer
from .base import ATTENTION, TINY, Family, attention_fields, base_config
from .mamba2 import MAMBA2, mamba2_fields

__all__ = ["FalconH1Mamba2Mixer", "FalconH1MLPHooks", "FalconH1Block", "FalconH1"]


class FalconH1Mamba2Mixer(Mamba2Mixer):
    """Falcon-H1's Mamba-2: muP-scaled projections, an optional gated RMSNorm."""

    def project(self, hidden_states: Tensor) -> Float[Tensor, "batch pos channel"]:
        m = self.hf
        return m.in_proj(hidden_states * m.ssm_in_multiplier) * m.mup_vector

    def gated_norm(
        self, scan_output: Float[Tensor, "batch pos inner"], gate: Float[Tensor, "batch pos inner"]
    ) -> Float[Tensor, "batch pos inner"]:
        if self.hf.mamba_rms_norm:
            return self.hf.norm(scan_output, gate)
        return scan_output * F.silu(gate)


class FalconH1MLPHooks(GatedMLPHooks):
    """Falcon-H1's SwiGLU MLP: ``down_multiplier * down_proj(up_proj(x) * act(gate_multiplier * gate_proj(x)))``.

    ``hook_pre`` carries the scaled gate projection; ``W_out`` and ``b_out`` include the down
    multiplier, so that neuron results add up to the MLP's output.
    """

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.hf.down_proj.weight.T * self.hf.down_multiplier

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        return output_bias(self.hf.down_proj) * self.hf.down_multiplier

    def forward(self, x: Tensor) -> Tensor:
        m = self.hf
        pre = self.hook_pre(m.gate_proj(x) * m.gate_multiplier)
        pre_linear = self.hook_pre_linear(m.up_proj(x))
        return m.down_proj(self.hook_post(pre_linear * m.act_fn(pre))) * m.down_multiplier


class FalconH1Block(BlockHooks):
    """A Falcon-H1 layer: Mamba-2 and attention in parallel, then the MLP.

    Hook points: ``hook_resid_pre``, ``ln1.hook_normalized``, ``mixer.*``, ``attn.hook_out`` (each
    before its output multiplier), ``hook_attn_out`` (their sum after the multipliers: what the
    layer adds), ``hook_resid_mid``, ``ln2.hook_normalized``, ``mlp.*``, ``hook_mlp_out``,
    ``hook_resid_post``.

    Args:
        hf_layer: The ``FalconH1DecoderLayer``.
        index: Its depth.
        context: The model's run context.
    """

    mixer_name = MAMBA2.container
    additive_residual = False  # the two mixers' outputs are scaled before they are added

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.ln1 = NormHooks(hf_layer.input_layernorm)
        self.mixer = FalconH1Mamba2Mixer(hf_layer.mamba, context)
        self.attn = AttentionOutputHooks(hf_layer.self_attn)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_mid = HookPoint("batch pos d_model")
        self.ln2 = NormHooks(hf_layer.pre_ff_layernorm)
        self.mlp = FalconH1MLPHooks(hf_layer.feed_forward)
        self.hook_mlp_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def passed_through(self, hidden_states: Tensor) -> tuple[Tensor]:
        return (hidden_states,)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        mamba_attention_mask: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor]:
        """Same computation as ``FalconH1DecoderLayer.forward``, with hooks (the output in a 1-tuple, as there)."""
        layer = self.hf
        residual = self.enter(hidden_states)
        normed = self.ln1(residual)
        mamba_out = self.mixer(normed, cache=cache, attention_mask=mamba_attention_mask, **kwargs)
        attention_in = normed * layer.attention_in_multiplier
        attention_out = self.attn(attention_in, attention_mask=attention_mask, cache=cache, **kwargs)
        mixed = mamba_out * layer.ssm_out_multiplier + attention_out * layer.attn_out_multiplier
        mixed = self.hook_attn_out(mixed)
        residual = self.hook_resid_mid(residual + mixed)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(residual)))
        return (self.hook_resid_post(residual + mlp_out),)


class FalconH1(Family):
    """Falcon-H1: Mamba-2 and attention in parallel in every layer, muP multipliers."""

    name = "falcon_h1"
    hf_class_names = ("FalconH1ForCausalLM",)
    final_norm_path = "model.final_layernorm"
    layer_kinds = (MAMBA2,)
    uses_position_ids = True
    example_hub_id = "tiiuae/Falcon-H1-0.5B-Instruct"

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> FalconH1Block:
        return FalconH1Block(hf_layer, index, context)

    @classmethod
    def logit_multiplier(cls, config: Any) -> float:
        return config.lm_head_multiplier

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[MAMBA2.name] * c.num_hidden_layers,
            d_mlp=c.intermediate_size,
            **mamba2_fields(cls.layers(hf_model)[0].mamba),
            **attention_fields(c),
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> FalconH1Config:
        """2 layers; 6 Mamba-2 heads in 2 groups, d_state 16, head_dim 8; every muP multiplier away from 1.

        The Mamba-2 output is gated by ``silu(z)`` alone, as in the released models
        (``mamba_rms_norm=True`` selects the gated RMSNorm instead).
        """
        params = dict(
            TINY,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mamba_d_ssm=48,
            mamba_n_heads=6,
            mamba_d_head=8,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_chunk_size=32,
            mamba_rms_norm=False,
            embedding_multiplier=2.0,
            lm_head_multiplier=0.5,
            mlp_multipliers=[0.8, 1.3],
            key_multiplier=0.6,
            attention_in_multiplier=1.4,
            attention_out_multiplier=0.7,
            ssm_multipliers=[0.9, 1.2, 0.8, 1.1, 0.7],
            ssm_in_multiplier=1.3,
            ssm_out_multiplier=0.6,
            max_position_embeddings=2048,
        )
        params.update(overrides)
        return FalconH1Config(**params)
