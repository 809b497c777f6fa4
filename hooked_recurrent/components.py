"""Hook points for the parts of a block that are not the token mixer: norms, MLP, embedding.

Each class holds hook points and a plain (unregistered) reference to the HF module it wraps, so
the HF parameters keep their paths and are never copied.
"""

from __future__ import annotations

from torch import Tensor, nn

from .hook_points import HookPoint

__all__ = ["NormHooks", "GatedMLPHooks", "MLPOutputHooks", "mlp_hooks", "OutputHook"]


class NormHooks(nn.Module):
    """``ln1`` / ``ln2`` / ``ln_final``: the normalised output of an RMSNorm.

    Args:
        hf_module: The HF norm module.
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.hook_normalized = HookPoint("batch pos d_model")

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(type(self.hf).forward(self.hf, x))


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

    def forward(self, x: Tensor) -> Tensor:
        m = self.hf
        pre = self.hook_pre(m.gate_proj(x))
        pre_linear = self.hook_pre_linear(m.up_proj(x))
        return m.down_proj(self.hook_post(m.act_fn(pre) * pre_linear))


class MLPOutputHooks(nn.Module):
    """Any other MLP (mixtures of experts...), run unchanged; the block hooks its output.

    Modules that return ``(output, router logits)`` give their output only.
    """

    def __init__(self, hf_module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module

    def forward(self, x: Tensor) -> Tensor:
        out = self.hf(x)
        return out[0] if isinstance(out, tuple) else out


def mlp_hooks(hf_module: nn.Module) -> GatedMLPHooks | MLPOutputHooks:
    """The hook container of an HF MLP: `GatedMLPHooks` where it fits, else `MLPOutputHooks`."""
    return GatedMLPHooks(hf_module) if GatedMLPHooks.fits(hf_module) else MLPOutputHooks(hf_module)


class OutputHook(nn.Module):
    """Passes an HF module's output through one hook point (e.g. the embedding -> ``hook_embed``)."""

    def __init__(self, hf_module: nn.Module, hook_point: HookPoint) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.__dict__["hook_point"] = hook_point  # owned (and named) by the root model

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hook_point(type(self.hf).forward(self.hf, *args, **kwargs))
