"""The description of a hooked model (``model.cfg``), read from its Hugging Face config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["HookedRecurrentConfig"]


@dataclass
class HookedRecurrentConfig:
    """What a `HookedRecurrentModel` is made of.

    Attributes:
        model_name: Hub id, local path or short name the model was loaded from.
        architecture: The HF class, e.g. ``"Qwen3_5ForCausalLM"`` or ``"Mamba2ForCausalLM"``.
        n_layers: Number of blocks.
        d_model: Residual stream width.
        d_vocab: Vocabulary size.
        layer_types: Kind of each block's mixer, e.g. ``"gated_deltanet"``, ``"attention"`` or
            ``"mamba2"`` (the kinds are listed by `hooked_recurrent.families.LAYER_KINDS`).
        n_heads: Recurrent heads per matrix-recurrent layer (GDN value heads, Mamba-2 heads).
        d_k: Key dimension of each head's state (GDN key head dim, Mamba-2 ``d_state``).
        d_v: Value dimension of each head's state (GDN value head dim, Mamba-2 ``head_dim``).
        n_key_heads: Delta-rule query/key heads (shared by ``n_heads // n_key_heads`` value heads).
        n_groups: Mamba-2 B/C groups (shared by ``n_heads // n_groups`` heads).
        d_mlp: Width of the gated MLPs (None when the blocks' MLPs are all mixtures of experts, or
            there are none).
        n_attn_heads: Query heads of attention layers.
        n_kv_heads: Key/value heads of attention layers.
        d_head: Head dimension of attention layers.
        conv_kernel: Width of the short causal convolution.
        dtype: Parameter dtype.
        device: Device of the parameters.
        default_prepend_bos: Whether `to_tokens` prepends a BOS token by default.
        attn_only: Whether no block has an MLP (TransformerLens' name: the token mixers are the
            only sublayers, as in Mamba-2); the model sets it from its blocks.
    """

    model_name: str
    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    layer_types: list[str]
    n_heads: int
    d_k: int
    d_v: int
    n_key_heads: int | None = None
    n_groups: int | None = None
    d_mlp: int | None = None
    n_attn_heads: int | None = None
    n_kv_heads: int | None = None
    d_head: int | None = None
    conv_kernel: int | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    default_prepend_bos: bool = False
    normalization_type: str = "RMS"
    attn_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recurrent_layers(self) -> list[int]:
        """Indices of the matrix-recurrent layers (those with write and state hooks)."""
        kinds = _layer_kinds()
        return [i for i, kind in enumerate(self.layer_types) if kinds[kind].recurrent]

    def mixer_name(self, layer: int) -> str:
        """The hook sub-path of a layer's mixer, e.g. ``linear_attn``, ``attn`` or ``mixer``."""
        return _layer_kinds()[self.layer_types[layer]].container

    def hook_name(self, layer: int, hook: str) -> str:
        """Full name of a mixer hook, e.g. ``cfg.hook_name(9, "hook_write")``.

        Raises:
            ValueError: ``layer`` is not a block index ``0..n_layers - 1`` (negative indices are
                refused: a hook name needs the block's own number).
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer={layer!r} is not a block of this model: give 0..{self.n_layers - 1} "
                f"(matrix-recurrent layers: {self.recurrent_layers})"
            )
        return f"blocks.{layer}.{self.mixer_name(layer)}.{hook}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d


def _layer_kinds() -> dict:
    # The families describe models with this class, so their table is imported when first needed.
    from .families import LAYER_KINDS

    return LAYER_KINDS
