"""Tiny random models built from the real HF config classes, for tests and demos.

They load by name without any download: ``HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")``.
There is one per family (``tiny-random:<family name>``; each family's file holds its config).
Weights are random but scaled so that every part matters for the logits (HF's default init of
std 0.02 leaves a tiny model's recurrence almost invisible in its output), and decays are slow
enough that states carry information across many positions and several recurrence chunks.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .families import FAMILIES, Family

__all__ = ["PRESETS", "build_preset"]

PRESETS: dict[str, type[Family]] = {f"tiny-random:{family.name}": family for family in FAMILIES}


def build_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a preset's HF model with random weights (deterministic for a seed).

    Args:
        name: A key of `PRESETS`.
        seed: Seed of the random weights.
        dtype: Parameter dtype.
    """
    if name not in PRESETS:
        raise KeyError(f"Unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].build_preset(seed=seed, dtype=dtype)
