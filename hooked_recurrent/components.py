"""Hook points for the parts of a block that are not the token mixer: norms, MLP, embedding.

Each class holds hook points and a plain (unregistered) reference to the HF module it wraps, so
the HF parameters keep their paths and are never copied.
"""

from __future__ import annotations

from torch import Tensor, nn

from .hook_points import HookPoint

__all__ = ["NormHooks", "MLPHooks", "OutputHook"]


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


class MLPHooks(nn.Module):
    """The gated (SwiGLU) MLP of a Qwen3.5 block.

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

    def forward(self, x: Tensor) -> Tensor:
        m = self.hf
        pre = self.hook_pre(m.gate_proj(x))
        pre_linear = self.hook_pre_linear(m.up_proj(x))
        return m.down_proj(self.hook_post(m.act_fn(pre) * pre_linear))


class OutputHook(nn.Module):
    """Passes an HF module's output through one hook point (e.g. the embedding -> ``hook_embed``)."""

    def __init__(self, hf_module: nn.Module, hook_point: HookPoint) -> None:
        super().__init__()
        self.__dict__["hf"] = hf_module
        self.__dict__["hook_point"] = hook_point  # owned (and named) by the root model

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hook_point(type(self.hf).forward(self.hf, *args, **kwargs))
