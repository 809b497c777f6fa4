"""Hook points for the parts of a block that are not the token mixer: norms, MLP, embedding.

Each class holds hook points and a plain (unregistered) reference to the HF module it wraps, so
the HF parameters keep their paths and are never copied.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .hook_points import HookPoint, fire

__all__ = ["NormHooks", "GatedMLPHooks", "MLPOutputHooks", "mlp_hooks", "OutputHook", "output_bias"]


class NormHooks(nn.Module):
    """``ln1`` / ``ln2`` / ``ln_final``: the scale and the normalised output of an RMS (or layer) norm.

    Hook points::

        hook_scale       [batch, pos, 1]         sqrt(mean(x^2) + eps), of x - mean(x) for a LayerNorm (lazy)
        hook_normalized  [batch, pos, d_model]   the norm's output

    ``hook_scale`` is TransformerLens' (what ``ActivationCache.apply_ln_to_stack`` divides by); it
    is computed only when hooked. Observing it changes nothing; an edit divides the input by the
    edited scale instead (the output is rescaled by ``scale / edited``), as in TransformerLens.

    Args:
        hf_module: The HF norm module.
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.hook_scale = HookPoint("batch pos 1")
        self.hook_normalized = HookPoint("batch pos d_model")

    def forward(self, x: Tensor) -> Tensor:
        out = type(self.hf).forward(self.hf, x)
        if self.hook_scale.has_fwd_hooks() or self.hook_scale.has_hooks(dir="bwd"):
            scale = self.scale(x)
            edited, changed = fire(self.hook_scale, scale, 0)
            if changed is not None:
                out = (out * (scale / edited)).to(out.dtype)
        return self.hook_normalized(out)

    def scale(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos 1"]:
        """The norm's divisor for each position, in float32 as the HF norms compute it."""
        hf = self.hf
        eps = getattr(hf, "variance_epsilon", getattr(hf, "eps", 1e-6))
        x = x.float()
        if isinstance(hf, nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


class GatedMLPHooks(nn.Module):
    """A gated (SwiGLU-style) MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    Hook points::

        hook_pre         [batch, pos, d_mlp]   gate projection, before the activation
        hook_pre_linear  [batch, pos, d_mlp]   up projection
        hook_post        [batch, pos, d_mlp]   act(hook_pre) * hook_pre_linear
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.hook_pre = HookPoint("batch pos d_mlp")
        self.hook_pre_linear = HookPoint("batch pos d_mlp")
        self.hook_post = HookPoint("batch pos d_mlp")

    @staticmethod
    def fits(hf_module: nn.Module) -> bool:
        """Whether an HF MLP has this form (its projections and activation under these names)."""
        return all(hasattr(hf_module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """The down projection, TransformerLens' ``W_out`` layout (neuron -> residual direction)."""
        return self.hf.down_proj.weight.T

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        """The down projection's bias (zeros when it has none)."""
        return output_bias(self.hf.down_proj)

    def forward(self, x: Tensor) -> Tensor:
        m = self.hf
        pre = self.hook_pre(m.gate_proj(x))
        pre_linear = self.hook_pre_linear(m.up_proj(x))
        return m.down_proj(self.hook_post(m.act_fn(pre) * pre_linear))


class MLPOutputHooks(nn.Module):
    """Any other MLP (mixtures of experts...), run unchanged; the block hooks its output.

    Modules that return ``(output, router logits)`` give their output only. Arguments after the
    input (Zamba2's shared MLP takes the layer index) are passed on.
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        out = self.hf(x, *args)
        return out[0] if isinstance(out, tuple) else out


def mlp_hooks(hf_module: nn.Module) -> GatedMLPHooks | MLPOutputHooks:
    """The hook container of an HF MLP: `GatedMLPHooks` where it fits, else `MLPOutputHooks`."""
    return GatedMLPHooks(hf_module) if GatedMLPHooks.fits(hf_module) else MLPOutputHooks(hf_module)


def output_bias(linear: nn.Linear) -> Float[Tensor, " d_out"]:
    """A linear layer's bias, or zeros when it has none (what it adds whatever its input)."""
    if linear.bias is not None:
        return linear.bias
    return linear.weight.new_zeros(linear.weight.shape[0])


class OutputHook(nn.Module):
    """Passes an HF module's output through one hook point (e.g. the embedding -> ``hook_embed``)."""

    def __init__(self, hf_module: nn.Module, hook_point: HookPoint) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.__dict__["hook_point"] = hook_point  # owned (and named) by the root model

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hook_point(type(self.hf).forward(self.hf, *args, **kwargs))
