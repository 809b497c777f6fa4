"""The k highest-scoring positions of every atom over a stream of batches, kept with their contexts.

A dashboard shows, per atom, the contexts where it fires hardest. Holding every activation to sort
them afterwards costs ``positions x d_sae`` numbers (8 GB for 2,048 atoms over a million tokens);
`TopKContexts` instead merges each batch into a running top-k and keeps, for each kept position, a
window of token ids and of the atom's scores around it. Its memory is ``d_sae x k x window``,
whatever the length of the stream, and the result equals a sort over the whole stream.

Example:
    >>> import torch
    >>> top = TopKContexts(n_atoms=2, k=1, before=1, after=0)
    >>> top.update(torch.tensor([[[0.0, 1.0], [2.0, 0.5]]]), torch.tensor([[7, 8]]), first_sequence=0)
    >>> top.contexts(0)[0].value, top.contexts(0)[0].tokens
    (2.0, [7, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["TopKContexts", "RawContext"]


@dataclass
class RawContext:
    """One kept position of one atom, with token ids (not yet strings).

    Attributes:
        value: The score at the position.
        sequence: Row of the token source.
        position: Position in that row.
        center: Index of the position inside ``tokens``.
        tokens: Token ids of the window (clipped at the row's ends).
        values: The atom's score at each token of the window.
    """

    value: float
    sequence: int
    position: int
    center: int
    tokens: list[int]
    values: list[float]


class TopKContexts:
    """A running top-k per atom over batches of ``[batch, pos, n_atoms]`` scores.

    Args:
        n_atoms: Number of atoms (last axis of the scores).
        k: Positions kept per atom.
        before: Tokens of context kept before each position.
        after: Tokens of context kept after it.
        positive_only: Keep only positions whose score is > 0 (activations: a zero is no firing).
    """

    def __init__(self, n_atoms: int, k: int, before: int, after: int, positive_only: bool = True) -> None:
        if k < 1 or before < 0 or after < 0:
            raise ValueError(f"need k >= 1 and before, after >= 0 (got k={k}, before={before}, after={after})")
        self.k, self.before, self.after, self.positive_only = k, before, after, positive_only
        width = before + 1 + after
        self.values = torch.full((n_atoms, k), -torch.inf)
        self.sequence = torch.full((n_atoms, k), -1, dtype=torch.long)
        self.position = torch.full((n_atoms, k), -1, dtype=torch.long)
        self.window_tokens = torch.full((n_atoms, k, width), -1, dtype=torch.long)
        self.window_values = torch.zeros(n_atoms, k, width)

    @torch.no_grad()
    def update(
        self,
        scores: Float[Tensor, "batch pos n_atoms"],
        tokens: Int[Tensor, "batch pos"],
        first_sequence: int,
        valid: Bool[Tensor, "batch pos"] | None = None,
    ) -> None:
        """Merge one batch.

        Args:
            scores: Every atom's score at every position of the batch.
            tokens: The batch's token ids.
            first_sequence: Row of the token source that the batch's first row is.
            valid: Positions that may be kept (others are ignored); None keeps all.
        """
        batch, length, n_atoms = scores.shape
        scores = scores.detach().float().cpu()
        tokens = tokens.cpu()
        flat = scores.reshape(batch * length, n_atoms)
        if valid is not None:
            flat = flat.masked_fill(~valid.cpu().reshape(-1, 1), -torch.inf)
        top = flat.topk(min(self.k, batch * length), dim=0, sorted=False)  # [kk, n]
        cand_values, flat_index = top.values.T, top.indices.T  # [n, kk]
        rows, cols = flat_index // length, flat_index % length
        offsets = torch.arange(-self.before, self.after + 1)
        where = cols[..., None] + offsets  # [n, kk, width]
        inside = (where >= 0) & (where < length)
        where = where.clamp(0, length - 1)
        rows3 = rows[..., None].expand_as(where)
        atoms3 = torch.arange(n_atoms)[:, None, None].expand_as(where)
        cand_window_values = scores[rows3, where, atoms3] * inside
        cand_window_tokens = torch.where(inside, tokens[rows3, where], -1)

        values = torch.cat([self.values, cand_values], dim=1)
        keep = _stable_topk(values, self.k)
        self.values = values.gather(1, keep)
        self.sequence = torch.cat([self.sequence, rows + first_sequence], 1).gather(1, keep)
        self.position = torch.cat([self.position, cols], 1).gather(1, keep)
        keep3 = keep[..., None].expand(-1, -1, offsets.numel())
        self.window_tokens = torch.cat([self.window_tokens, cand_window_tokens], 1).gather(1, keep3)
        self.window_values = torch.cat([self.window_values, cand_window_values], 1).gather(1, keep3)

    def contexts(self, atom: int) -> list[RawContext]:
        """The kept positions of ``atom``, highest score first."""
        # One conversion to Python lists per field: element-wise tensor indexing costs far more.
        rows = zip(self.values[atom].tolist(), self.sequence[atom].tolist(), self.position[atom].tolist(),
                   self.window_tokens[atom].tolist(), self.window_values[atom].tolist())  # fmt: skip
        out = []
        for value, sequence, position, tokens, values in rows:
            if value == -torch.inf or (self.positive_only and not value > 0):
                continue
            inside = [j for j, t in enumerate(tokens) if t >= 0]  # the window clipped to its row
            out.append(RawContext(
                value=value,
                sequence=sequence,
                position=position,
                center=self.before - inside[0],
                tokens=[tokens[j] for j in inside],
                values=[values[j] for j in inside],
            ))
        return out


def _stable_topk(values: Float[Tensor, "n m"], k: int) -> Int[Tensor, "n k"]:
    """Indices of the k largest entries per row, highest first (equal values: kept entries first)."""
    return torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
