"""Where an SAE's atoms fire on a set of sequences, kept sparse: the input of every protocol's selection.

`scan_activity` encodes a cell's states (or writes) at every position, a few sequences at a time,
and keeps one entry per nonzero code: (sequence, position, atom, code, cosine of the atom to the
native write there). From it come the firings a protocol tests (`select_firings`), the most
frequent atoms, and the register / bundle partition of *every* alive atom by its median cosine to
the writes it fires on (paper §2.8, `partition_alive`). Memory is proportional to the number of
active codes, never to ``positions x d_sae`` or ``positions x d_k x d_v`` of the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from writesae.config import has_factor_decoder

from .cell import Cell, encode_trace, trace_cell
from .stats import AtomPartition, partition_atoms

__all__ = ["Firing", "Activity", "scan_activity", "select_firings", "partition_alive", "atom_write_cosines"]


@dataclass(frozen=True)
class Firing:
    """A position where an atom fires, with its code there."""

    sequence: int
    position: int
    atom: int
    activation: float


@dataclass
class Activity:
    """The nonzero codes of an SAE over ``n_sequences x length`` positions, one entry each.

    Attributes:
        sequence: Sequence of each entry [n].
        position: Position of each entry [n].
        atom: Atom of each entry [n].
        value: Its code (> 0) [n].
        cosine: Frobenius cosine of the atom to the native write at that position [n].
        n_sequences: Sequences scanned.
        length: Positions per sequence.
        d_sae: Atoms of the SAE.
        n_positions: Positions scanned (padding excluded).
    """

    sequence: Tensor
    position: Tensor
    atom: Tensor
    value: Tensor
    cosine: Tensor
    n_sequences: int
    length: int
    d_sae: int
    n_positions: int
    _index: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def codes_at(self, sequence: int, position: int) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
        """The atoms active at one position and their codes."""
        if self._index is None:
            keys = (self.sequence * self.length + self.position).numpy()
            order = np.argsort(keys, kind="stable")
            self._index = (keys[order], order)
        keys, order = self._index
        key = sequence * self.length + position
        lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
        rows = torch.from_numpy(order[lo:hi])
        return self.atom[rows], self.value[rows]

    def firing_counts(self) -> Int[Tensor, " d_sae"]:
        """Positions where each atom fires."""
        return torch.bincount(self.atom, minlength=self.d_sae)

    def frequent_atoms(self, n: int) -> list[int]:
        """The ``n`` atoms that fire at the most positions (ties: lower index first)."""
        counts = self.firing_counts()
        order = sorted(range(self.d_sae), key=lambda a: (-int(counts[a]), a))
        return [a for a in order[:n] if counts[a] > 0]

    def median_cosines(self) -> dict[int, float]:
        """Median cosine of each alive atom to the native writes at its firings."""
        atoms, cosines = self.atom.numpy(), self.cosine.numpy()
        order = np.argsort(atoms, kind="stable")
        alive, starts = np.unique(atoms[order], return_index=True)
        groups = np.split(cosines[order], starts[1:])
        return {int(a): float(np.median(g)) for a, g in zip(alive, groups)}


def atom_write_cosines(
    sae: Any, atoms: Int[Tensor, " n"], key: Float[Tensor, "n d_k"], value: Float[Tensor, "n d_v"]
) -> Float[Tensor, " n"]:
    """Frobenius cosine of atom ``atoms[i]`` to the rank-1 write ``key[i] value[i]^T``.

    ``<A, k u^T> = k^T A u`` needs only the factors (``sum_r (v_r . k)(w_r . u)``), never the matrices.
    """
    with torch.no_grad():
        norms = sae.get_W_dec_norm().float().cpu()[atoms]
        if has_factor_decoder(sae.cfg.variant):
            key_f = sae.atom_key.detach().float().cpu()[atoms]  # [n, r, d_k]
            value_f = sae.atom_value.detach().float().cpu()[atoms]
            inner = ((key_f @ key[:, :, None]).squeeze(-1) * (value_f @ value[:, :, None]).squeeze(-1)).sum(-1)
        else:
            inner = torch.einsum("nkv,nk,nv->n", sae.atom_matrices(atoms).detach().float().cpu(), key, value)
    return inner / (norms * key.norm(dim=-1) * value.norm(dim=-1)).clamp(min=1e-30)


@torch.no_grad()
def scan_activity(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    cell: Cell,
    kind: str,
    *,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
) -> Activity:
    """Encode the cell at every (unpadded) position of ``tokens`` and keep the nonzero codes.

    Args:
        model: The hooked model.
        sae: The cell's SAE.
        tokens: The sequences (e.g. the validation split).
        cell: The SAE's cell.
        kind: ``"state"`` or ``"write"``: what the SAE reads.
        attention_mask: Padding mask; padded positions are skipped.
        batch_size: Sequences traced at once (memory: ``batch_size x pos x d_sae`` codes, and as
            many states for a state SAE).
    """
    parts: list[tuple[Tensor, ...]] = []
    n_positions = 0
    for first in range(0, tokens.shape[0], batch_size):
        rows = slice(first, first + batch_size)
        mask = None if attention_mask is None else attention_mask[rows]
        trace = trace_cell(model, tokens[rows], cell, attention_mask=mask, with_states=kind == "state")
        codes = encode_trace(sae, trace, kind).float().cpu()
        if mask is not None:
            codes = codes * mask.cpu()[..., None].to(codes.dtype)
        n_positions += int(codes.shape[0] * codes.shape[1] if mask is None else mask.sum())
        b, t, a = (codes > 0).nonzero(as_tuple=True)
        cosine = atom_write_cosines(sae, a, trace.key[b, t].float(), trace.value[b, t].float())
        parts.append((b + first, t, a, codes[b, t, a], cosine))
    sequence, position, atom, value, cosine = (torch.cat(p) for p in zip(*parts))
    return Activity(sequence, position, atom, value, cosine, tokens.shape[0], tokens.shape[1], sae.cfg.d_sae, n_positions)


def select_firings(
    activity: Activity,
    *,
    atoms: list[int] | None = None,
    max_per_atom: int = 30,
    valid: Tensor | None = None,
    seed: int = 0,
) -> list[Firing]:
    """Positions where atoms fire, at most ``max_per_atom`` per atom (a seeded sample), sorted.

    Args:
        activity: The scan.
        atoms: Atoms of interest (default: every atom that fires).
        max_per_atom: Cap per atom.
        valid: ``[batch, pos]`` bool, positions that may be used (e.g. not the last ones).
        seed: Seed of the sample.
    """
    keep = torch.ones(len(activity.atom), dtype=torch.bool)
    if valid is not None:
        keep &= valid.cpu()[activity.sequence, activity.position]
    chosen = sorted(set(activity.atom[keep].tolist())) if atoms is None else atoms
    generator = torch.Generator().manual_seed(seed)
    firings = []
    for atom in chosen:
        rows = (keep & (activity.atom == atom)).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)[:max_per_atom]]
        firings += [
            Firing(int(activity.sequence[r]), int(activity.position[r]), atom, float(activity.value[r])) for r in rows
        ]
    return sorted(firings, key=lambda f: (f.sequence, f.position, f.atom))


def partition_alive(activity: Activity, threshold: float | None = None, seed: int = 0) -> AtomPartition:
    """Register / bundle classes of every atom that fires on the scanned sequences (paper §2.8).

    Args:
        activity: The scan (the paper partitions on its validation split).
        threshold: ``None``: the two-component Gaussian mixture assigns the classes (the main
            text's Fig. 2a); a number: register iff median cosine >= threshold (the tables' 0.05).
        seed: Seed of the mixture fit.
    """
    return partition_atoms(activity.median_cosines(), threshold=threshold, seed=seed)
