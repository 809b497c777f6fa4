"""Block-level hook points (the residual stream), the per-call run context, and how blocks install.

Each depth of the HF model (one module per depth: the entries of its layer list) gets a block hook
container whose forward replaces that module's forward. It does the same computation with the
residual stream passed through hook points, and calls the hook containers of its norms, mixer and
MLP, which compute with the HF submodules' own parameters. Only the per-depth modules are patched
(never their submodules), so a module that several depths share (Zamba2's shared transformer
block) gets one set of hook points per use, and every HF module stays at its path with its
parameters. The common layout (`PreNormBlock`)::

    blocks.{l}.hook_resid_pre    [batch, pos, d_model]
    blocks.{l}.ln1.hook_normalized
    blocks.{l}.<mixer>.*         linear_attn (delta rule, linear attention), attn or mixer (Mamba-2)
    blocks.{l}.hook_attn_out     [batch, pos, d_model]   the mixer's output (TransformerLens' name)
    blocks.{l}.hook_resid_mid    [batch, pos, d_model]   (blocks with an MLP)
    blocks.{l}.ln2.hook_normalized
    blocks.{l}.mlp.*             (gated MLPs; other MLPs such as mixtures of experts run unchanged)
    blocks.{l}.hook_mlp_out      [batch, pos, d_model]
    blocks.{l}.hook_resid_post   [batch, pos, d_model]

Families with another layout (post-norm layers, scaled residuals...) subclass `BlockHooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .components import NormHooks, mlp_hooks
from .hook_points import HookPoint

__all__ = ["RunContext", "StopForward", "BlockHooks", "PreNormBlock", "FinalNormHooks"]


@dataclass
class RunContext:
    """Per-call settings shared by the root model and its blocks.

    Attributes:
        stop_at_layer: Stop before this block and return the residual stream (None: run all).
        start_position: Absolute position of the first token of the current call (non-zero when
            continuing a cache or generating). A hook at a position-``p`` slice of the current
            call sits at absolute position ``start_position + p``.
        start_at_layer: Skip the blocks below this one (they pass their input on untouched and
            leave their cache alone); this block reads ``start_residual`` instead of its input.
            Set by `hooked_recurrent.fork.run_from_layer` (forks whose edits all sit at or above
            a layer compute the layers below once, not once per condition).
        start_residual: The residual stream entering block ``start_at_layer`` ``[batch, pos, d_model]``.
    """

    stop_at_layer: int | None = None
    start_position: int = 0
    padding_mask: Tensor | None = None  # [batch, pos] of this call, when it has padding
    start_at_layer: int | None = None
    start_residual: Tensor | None = None


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


class BlockHooks(nn.Module):
    """Base of the hook container of the layer at one depth.

    Subclasses register their hook points (in execution order, ending with ``hook_resid_post``)
    and implement ``forward(hidden_states, **kwargs)`` with the HF layer's computation; the HF
    model calls it with the keyword arguments it passes its layers.

    Args:
        hf_layer: The HF layer at this depth.
        index: The depth.
        context: The model's run context.
    """

    mixer_name: str  # the name of the mixer's hook container
    # Whether the residual stream is a plain sum (resid_post = resid_pre + attn_out [+ mlp_out]), so
    # that it decomposes into its components' outputs (ActivationCache.decompose_resid and kin).
    additive_residual: bool = True
    # Whether the block norms its mixer's and MLP's outputs before adding them (post-norm): its
    # heads' and neurons' results then do not add up to what reaches the residual stream.
    normed_outputs: bool = False

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_layer
        self.__dict__["context"] = context
        self.index = index
        self.hook_resid_pre = HookPoint("batch pos d_model")

    def install(self) -> None:
        """Route the HF layer at this depth through this container (its submodules are untouched)."""
        self.hf.forward = self._forward_unless_skipped

    def _forward_unless_skipped(self, *args: Any, **kwargs: Any) -> Any:
        """`forward`, or nothing at all for a block below ``start_at_layer`` (its input goes on)."""
        start = self.context.start_at_layer
        if start is None or self.index >= start:
            return self.forward(*args, **kwargs)
        return self.passed_through(args[0] if args else kwargs["hidden_states"])

    def passed_through(self, hidden_states: Tensor) -> Any:
        """What the HF layer returns when its input goes on unchanged (its output's structure)."""
        return hidden_states

    def enter(self, hidden_states: Tensor) -> Tensor:
        """Honour ``stop_at_layer`` and ``start_at_layer``, and pass the block's input through ``hook_resid_pre``."""
        if self.context.stop_at_layer == self.index:
            raise StopForward(hidden_states)
        if self.context.start_at_layer == self.index:
            hidden_states = self.context.start_residual
        return self.hook_resid_pre(hidden_states)


class PreNormBlock(BlockHooks):
    """norm -> token mixer -> residual add, then (if the layer has an MLP) norm -> MLP -> residual add.

    Args:
        hf_layer: The HF layer at this depth.
        index: The depth.
        context: The model's run context.
        mixer_name: The name of the mixer's hook container (from its layer kind).
        mixer: The mixer's hook container, called with the HF layer's keyword arguments.
        norm1: The HF layer's attribute holding the norm before the mixer.
        norm2: The one before the MLP (None: the layer has no MLP).
        mlp: The HF layer's attribute holding the MLP.
    """

    def __init__(
        self,
        hf_layer: nn.Module,
        index: int,
        context: RunContext,
        mixer_name: str,
        mixer: nn.Module,
        *,
        norm1: str = "input_layernorm",
        norm2: str | None = "post_attention_layernorm",
        mlp: str = "mlp",
    ) -> None:
        super().__init__(hf_layer, index, context)
        self.mixer_name = mixer_name
        self.ln1 = NormHooks(getattr(hf_layer, norm1))
        self.add_module(mixer_name, mixer)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.has_mlp = norm2 is not None
        if self.has_mlp:
            self.hook_resid_mid = HookPoint("batch pos d_model")
            self.ln2 = NormHooks(getattr(hf_layer, norm2))
            self.mlp = mlp_hooks(getattr(hf_layer, mlp))
            self.hook_mlp_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        residual = self.enter(hidden_states)
        mixed = self.hook_attn_out(getattr(self, self.mixer_name)(self.ln1(residual), **kwargs))
        if not self.has_mlp:
            return self.hook_resid_post(residual + mixed)
        residual = self.hook_resid_mid(residual + mixed)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(residual)))
        return self.hook_resid_post(residual + mlp_out)
