"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, peak: float, warmup: int, floor_ratio: float = 0.1) -> float:
    """Learning rate for a zero-based optimizer step.

    Args:
        step: The step about to be taken, ``0 <= step < total_steps``.
        total_steps: Steps in the whole run.
        peak: Learning rate at the end of warmup.
        warmup: Warmup steps; step ``i < warmup`` uses ``peak * (i + 1) / warmup``
            so that the very first update is not wasted at zero.
        floor_ratio: Final learning rate as a fraction of ``peak``.

    Returns:
        The learning rate.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
