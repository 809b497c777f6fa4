"""Block-level hook points (the residual stream) and the per-call run context.

A block's ``forward`` replaces its HF layer's forward, doing the same computation with the
residual stream passed through hook points::

    blocks.{l}.hook_resid_pre    [batch, pos, d_model]
    blocks.{l}.ln1.hook_normalized
    blocks.{l}.<mixer>.*         linear_attn (Gated DeltaNet), attn (attention) or mixer (Mamba-2)
    blocks.{l}.hook_resid_mid    [batch, pos, d_model]   (blocks with an MLP)
    blocks.{l}.ln2.hook_normalized
    blocks.{l}.mlp.*
    blocks.{l}.hook_mlp_out      [batch, pos, d_model]
    blocks.{l}.hook_resid_post   [batch, pos, d_model]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .components import MLPHooks, NormHooks
from .hook_points import HookPoint
from .mixers.attention import GatedAttentionHooks
from .mixers.gated_deltanet import GatedDeltaNetHooks
from .mixers.mamba2 import Mamba2MixerHooks

__all__ = ["RunContext", "StopForward", "Qwen3_5BlockHooks", "Mamba2BlockHooks", "FinalNormHooks"]


@dataclass
class RunContext:
    """Per-call settings shared by the root model and its blocks.

    Attributes:
        stop_at_layer: Stop before this block and return the residual stream (None: run all).
        start_position: Absolute position of the first token of the current call (non-zero when
            continuing a cache or generating). A hook at a position-``p`` slice of the current
            call sits at absolute position ``start_position + p``.
    """

    stop_at_layer: int | None = None
    start_position: int = 0
    padding_mask: Tensor | None = None  # [batch, pos] of this call, when it has padding


class StopForward(Exception):
    """Raised to leave the HF forward early (``stop_at_layer``); carries the residual stream."""

    def __init__(self, residual: Tensor) -> None:
        super().__init__("stop_at_layer reached")
        self.residual = residual


class FinalNormHooks(NormHooks):
    """``ln_final``: honours ``stop_at_layer == n_layers`` before normalising."""

    def __init__(self, hf_module: nn.Module, context: RunContext, n_layers: int) -> None:
        super().__init__(hf_module)
        self.__dict__["context"] = context
        self.n_layers = n_layers

    def forward(self, x: Tensor) -> Tensor:
        if self.context.stop_at_layer == self.n_layers:
            raise StopForward(x)
        return super().forward(x)


class Qwen3_5BlockHooks(nn.Module):
    """Hook points of one Qwen3.5 decoder layer (Gated DeltaNet or attention, then a SwiGLU MLP).

    Args:
        hf_layer: The ``Qwen3_5DecoderLayer``.
        index: Its layer index.
        context: The model's run context.
    """

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_layer
        self.__dict__["context"] = context
        self.index = index
        self.hook_resid_pre = HookPoint("batch pos d_model")
        self.ln1 = NormHooks(hf_layer.input_layernorm)
        if hf_layer.block_type == "linear_attention":
            self.linear_attn = GatedDeltaNetHooks(hf_layer.linear_attn, context)
        else:
            self.attn = GatedAttentionHooks(hf_layer.self_attn)
        self.hook_resid_mid = HookPoint("batch pos d_model")
        self.ln2 = NormHooks(hf_layer.post_attention_layernorm)
        self.mlp = MLPHooks(hf_layer.mlp)
        self.hook_mlp_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    @property
    def mixer_name(self) -> str:
        return "linear_attn" if hasattr(self, "linear_attn") else "attn"

    def install(self) -> None:
        """Route the HF layer (and its mixer and MLP) through these hooks."""
        layer = self.hf
        layer.forward = self.forward
        if hasattr(self, "linear_attn"):
            layer.linear_attn.forward = self.linear_attn.forward
        else:
            layer.self_attn.forward = self.attn.forward
        layer.mlp.forward = self.mlp.forward

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        """Same computation as ``Qwen3_5DecoderLayer.forward``, with hooks."""
        if self.context.stop_at_layer == self.index:
            raise StopForward(hidden_states)
        layer = self.hf
        residual = self.hook_resid_pre(hidden_states)
        normed = self.ln1(residual)
        if hasattr(self, "linear_attn"):
            mixed = layer.linear_attn(hidden_states=normed, cache=cache, attention_mask=attention_mask, **kwargs)
        else:
            mixed, _ = layer.self_attn(
                hidden_states=normed,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        residual = self.hook_resid_mid(residual + mixed)
        mlp_out = self.hook_mlp_out(layer.mlp(self.ln2(residual)))
        return self.hook_resid_post(residual + mlp_out)


class Mamba2BlockHooks(nn.Module):
    """Hook points of one Mamba-2 block (norm, mixer, residual add; no MLP).

    Args:
        hf_layer: The ``Mamba2Block``.
        index: Its layer index.
        context: The model's run context.
    """

    mixer_name = "mixer"

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_layer
        self.__dict__["context"] = context
        self.index = index
        self.hook_resid_pre = HookPoint("batch pos d_model")
        self.ln1 = NormHooks(hf_layer.norm)
        self.mixer = Mamba2MixerHooks(hf_layer.mixer, context)
        self.hook_resid_post = HookPoint("batch pos d_model")

    def install(self) -> None:
        """Route the HF block and its mixer through these hooks."""
        self.hf.forward = self.forward
        self.hf.mixer.forward = self.mixer.forward

    def forward(self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Same computation as ``Mamba2Block.forward``, with hooks."""
        if self.context.stop_at_layer == self.index:
            raise StopForward(hidden_states)
        layer = self.hf
        residual = self.hook_resid_pre(hidden_states)
        normed = self.ln1(residual.to(dtype=layer.norm.weight.dtype))
        if layer.residual_in_fp32:
            residual = residual.to(torch.float32)
        mixed = layer.mixer(normed, cache=cache, attention_mask=attention_mask, **kwargs)
        return self.hook_resid_post(residual + mixed)
