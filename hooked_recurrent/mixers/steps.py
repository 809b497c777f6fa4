"""Steps every recurrent mixer takes the same way: padding, the short causal convolution, the cache.

transformers' recurrent mixers (Gated DeltaNet, Mamba-2, Kimi Delta Attention...) share these
steps line for line; the hooked mixers call them from here, with the HF module's own weights, so
that their results and cache updates are those of transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

# Every transformers model ships the same pair of short-convolution functions (each replaced by
# the causal_conv1d kernel when that is installed); one module's copy serves all families.
from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn, causal_conv1d_update

from ..hook_points import HookPoint

__all__ = ["mask_padding", "cached_state", "store_state", "short_convolution", "hooked_split"]


def mask_padding(hidden: Float[Tensor, "batch pos channel"], mask: Tensor | None) -> Float[Tensor, "batch pos channel"]:
    """Zero the inputs of padded positions (1 in ``mask`` = a real token), as transformers does."""
    if mask is None:
        return hidden
    return (hidden * mask[:, :, None]).to(hidden.dtype)


def cached_state(cache: Any, layer_idx: int) -> Tensor | None:
    """A layer's recurrent state in the cache as the HF model stores it, or None before its first call."""
    return None if cache is None else cache.get_recurrent_state(layer_idx, state_idx=0)


def store_state(cache: Any, layer_idx: int, state: Tensor) -> None:
    """Store a layer's new recurrent state (as the HF model stores it) in the cache.

    Layers with a short convolution are marked as started by their convolution state; a mixer
    without one (MiniMax's lightning attention) is marked here, so that `cached_state` returns
    the state at the next call.
    """
    cache.update_recurrent_state(state, layer_idx)
    cache.layers[layer_idx].has_previous_state[0] = True


def short_convolution(
    mixed: Float[Tensor, "batch pos channel"],
    conv1d: nn.Conv1d,
    activation: str | None,
    cache: Any,
    layer_idx: int,
) -> Float[Tensor, "batch pos channel"]:
    """The depthwise causal convolution (and activation) before the recurrence, with its cache.

    A single-token call with a started cache takes the per-step update; any other call
    convolves the new positions after the cached ones, and leaves the last inputs in the cache.
    """
    length = mixed.shape[1]
    x = mixed.transpose(1, 2)
    weight = conv1d.weight.squeeze(1)
    conv_state = None if cache is None else cache.get_conv_state(layer_idx, state_idx=0)
    if conv_state is not None and length == 1 and not cache.is_recording_past(layer_idx):
        out = causal_conv1d_update(x, conv_state, weight, conv1d.bias, activation)
    else:
        if cache is not None:
            x = cache.update_conv_state(x, layer_idx, conv_kernel_size=conv1d.kernel_size[0])
        out = causal_conv1d_fn(x, weight, conv1d.bias, activation=activation)[:, :, -length:]
    return out.transpose(1, 2)


def hooked_split(
    mixed: Float[Tensor, "batch pos channel"], parts: list[tuple[HookPoint, int, int]]
) -> Float[Tensor, "batch pos channel"]:
    """Pass the parts of a concatenated projection through their hook points.

    Args:
        mixed: The projection, its parts concatenated along the last axis.
        parts: ``(hook point, heads, head width)`` of each part, in order; a part is hooked as
            ``[batch, pos, heads, head width]``.

    Returns:
        ``mixed`` itself when no part is hooked (nothing is split), else the parts after their
        hooks, concatenated again.
    """
    if not any(point.has_fwd_hooks() for point, _, _ in parts):
        return mixed
    batch, length, _ = mixed.shape
    pieces = mixed.split([heads * width for _, heads, width in parts], dim=-1)
    hooked = [
        point(piece.reshape(batch, length, heads, width)).flatten(2)
        for piece, (point, heads, width) in zip(pieces, parts)
    ]
    return torch.cat(hooked, dim=-1)
