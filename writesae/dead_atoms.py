"""How many atoms may be dead, known on the host without waiting for the device.

AuxK ranks the dead atoms' pre-activations with a top-k whose size must be known on the host (it is
a tensor's shape), while the dead-atom counters live on the device. Reading them every step would
make the host wait for every step to finish. On a GPU, `DeadAtomBound` keeps a copy of the counters
taken a few steps earlier (copied asynchronously, picked up once it has landed) and bounds the
current count from it: a counter grows by at most one per step, so an atom dead now, ``s`` steps
after the copy, had a counter of at least ``dead_steps - s`` in it. The bound is never below the
true count, so AuxK with that many slots is AuxK over exactly the dead atoms (extra slots get
coefficient 0), and a bound of 0 skips AuxK. On the CPU the counters are counted directly.

Example:
    >>> import torch
    >>> DeadAtomBound(dead_steps=3, d_sae=3).slots(torch.tensor([0, 2, 5]), step=10)
    1
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["DeadAtomBound"]


class DeadAtomBound:
    """An upper bound on the number of dead atoms (see the module docstring).

    Args:
        dead_steps: Steps without firing after which an atom counts as dead.
        d_sae: Number of atoms.
    """

    def __init__(self, dead_steps: int, d_sae: int) -> None:
        self.dead_steps, self.d_sae = dead_steps, d_sae
        self._latest: tuple[Tensor, int] | None = None  # host copy of the counters, and its step
        self._in_flight: tuple[Tensor, int, torch.cuda.Event] | None = None

    def slots(self, counters: Int[Tensor, " d_sae"], step: int) -> int:
        """At least the number of atoms whose ``counters`` (after ``step`` steps) reach ``dead_steps``."""
        if counters.device.type != "cuda":
            return int((counters >= self.dead_steps).sum())  # a host tensor: no wait
        if self._in_flight is not None and self._in_flight[2].query():  # query() never waits
            host, taken, _ = self._in_flight
            self._latest, self._in_flight = (host, taken), None
        if self._in_flight is None:
            host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            host.copy_(counters, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
            self._in_flight = (host, step, landed)
        if self._latest is None:  # no copy has landed yet; a counter never exceeds the step count
            return self.d_sae if step >= self.dead_steps else 0
        host, taken = self._latest
        return int((host >= self.dead_steps - (step - taken)).sum())
