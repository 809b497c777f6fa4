"""Per-atom histograms filled from a stream, in memory that does not grow with the stream.

Two kinds:

- `GrowingHistograms`: activations, whose range is not known in advance. Each atom has ``n_bins``
  equal bins over ``[0, high)``, ``high`` a power of two; when a value reaches ``high`` the range
  doubles (as often as needed) and neighbouring bins merge, which is exact because the new edges are
  old ones. The counts at the end equal a histogram of all the values over the final range.
- `FixedHistograms`: values on a known grid (cosines in [-1, 1], horizons in tokens), with medians.

Example:
    >>> import torch
    >>> h = GrowingHistograms(n_atoms=1, n_bins=4)
    >>> h.update(torch.tensor([0, 0]), torch.tensor([0.3, 0.9]))
    >>> h.update(torch.tensor([0]), torch.tensor([3.5]))
    >>> h.high.tolist(), h.counts.tolist()
    ([4.0], [[2, 0, 0, 1]])
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["GrowingHistograms", "FixedHistograms"]


class GrowingHistograms:
    """Histograms of positive values per atom over a range that doubles as needed.

    Args:
        n_atoms: Number of atoms.
        n_bins: Bins per atom (a power of two, so that merged bins stay aligned).
    """

    def __init__(self, n_atoms: int, n_bins: int = 32) -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2 (got {n_bins})")
        self.n_bins = n_bins
        self.counts = torch.zeros(n_atoms, n_bins, dtype=torch.long)
        self.high = torch.zeros(n_atoms, dtype=torch.float64)  # 0 until the atom's first value

    @torch.no_grad()
    def update(self, atoms: Int[Tensor, " m"], values: Float[Tensor, " m"]) -> None:
        """Count ``values[j]`` for atom ``atoms[j]`` (values must be > 0)."""
        if atoms.numel() == 0:
            return
        values = values.double().cpu()
        atoms = atoms.cpu()
        peak = torch.zeros_like(self.high).scatter_reduce(0, atoms, values, "amax")
        grow = ((peak >= self.high) & (peak > 0)).nonzero()[:, 0]
        if grow.numel():
            self._grow(grow, peak[grow])
        bins = (values / self.high[atoms] * self.n_bins).long().clamp(max=self.n_bins - 1)
        self.counts.view(-1).index_add_(0, atoms * self.n_bins + bins, torch.ones_like(bins))

    def _grow(self, atoms: Int[Tensor, " g"], peak: Float[Tensor, " g"]) -> None:
        """Raise ``high`` above ``peak`` for these atoms, merging their bins."""
        old = self.high[atoms]
        fresh = old == 0
        # Smallest power of two strictly above the peak (so the peak falls inside [0, high)).
        new = torch.exp2(torch.floor(torch.log2(peak)) + 1)
        new = torch.where(fresh, new, torch.maximum(new, old))
        self.high[atoms] = new
        factor = torch.where(fresh, torch.ones_like(new), new / old).round().long()
        for f in factor.unique().tolist():
            if f == 1:
                continue
            rows = atoms[factor == f]
            merged = torch.zeros(len(rows), self.n_bins, dtype=torch.long)
            # Old bin j lands in new bin j // f.
            merged.index_add_(1, torch.arange(self.n_bins) // f, self.counts[rows])
            self.counts[rows] = merged

    def edges(self, atom: int) -> list[float]:
        """The ``n_bins + 1`` bin edges of ``atom`` (all zero if it never fired)."""
        high = float(self.high[atom])
        return [high * j / self.n_bins for j in range(self.n_bins + 1)]


class FixedHistograms:
    """Histograms per atom over fixed bin edges, with medians read off the counts.

    Values below the first edge go to the first bin and values at or above the last edge to the
    last bin (the last edge can stand for "this much or more").

    Args:
        n_atoms: Number of atoms.
        edges: Increasing bin edges (``len(edges) - 1`` bins).
    """

    def __init__(self, n_atoms: int, edges: Float[Tensor, " e"]) -> None:
        self.edges = edges.double()
        self.counts = torch.zeros(n_atoms, len(edges) - 1, dtype=torch.long)

    @torch.no_grad()
    def update(self, atoms: Int[Tensor, " m"], values: Float[Tensor, " m"]) -> None:
        """Count ``values[j]`` for atom ``atoms[j]``."""
        n_bins = self.counts.shape[1]
        bins = (torch.bucketize(values.double().cpu(), self.edges, right=True) - 1).clamp(0, n_bins - 1)
        self.counts.view(-1).index_add_(0, atoms.cpu() * n_bins + bins, torch.ones_like(bins))

    def median_bins(self) -> Int[Tensor, " n_atoms"]:
        """Per atom, the bin holding the median (the lower median for an even count); -1 if empty."""
        cumulative = self.counts.cumsum(1)
        total = cumulative[:, -1]
        half = (total + 1) // 2  # the ceil(n/2)-th smallest value
        index = (cumulative < half[:, None]).sum(1)
        return torch.where(total > 0, index, torch.full_like(index, -1))
