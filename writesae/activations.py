"""TopK and BatchTopK codes, returned both dense and as per-row (index, value) lists.

The decoder of a factor-form SAE never needs the dense ``[..., d_sae]`` code: it gathers the few active
atoms. So each rule returns a ``SparseCode``: the dense code (what SAELens' hooks see) plus ``indices`` and
``values`` of shape ``[..., n_active]``. ``n_active`` is ``k`` for TopK; for BatchTopK and thresholds it is
the largest number of active atoms of any row, and shorter rows are padded with zero values (padding
indices point at some inactive atom, so they add nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor


class SparseCode(NamedTuple):
    """A sparse code in both forms.

    Attributes:
        dense: ``[..., d_sae]`` code, zero off the active set.
        indices: ``[..., n_active]`` atom indices.
        values: ``[..., n_active]`` code values at ``indices`` (zero for padding).
    """

    dense: Float[Tensor, "*batch d_sae"]
    indices: Int[Tensor, "*batch n_active"]
    values: Float[Tensor, "*batch n_active"]


def topk_code(pre: Float[Tensor, "*batch d_sae"], k: int) -> SparseCode:
    """Per-sample TopK: keep the ``k`` largest pre-activations of each row, then ReLU them.

    Selection happens on the raw pre-activations and the ReLU after (Gao et al.; the reference code and
    SAELens' ``TopK`` do the same), so a row has at most ``k`` nonzeros.

    Args:
        pre: Pre-activations.
        k: Atoms kept per row.
    """
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    values = values.relu()
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    return SparseCode(dense, indices, values)


def batch_topk_code(pre: Float[Tensor, "*batch d_sae"], k: int) -> SparseCode:
    """BatchTopK: ReLU, then keep the ``k * n_rows`` largest entries of the whole batch.

    Rows share one budget, so a row may keep more or fewer than ``k`` atoms (Bussmann et al.).
    Every leading axis counts as batch.

    Args:
        pre: Pre-activations.
        k: Average number of atoms kept per row.
    """
    acts = pre.relu()
    flat = acts.reshape(-1)
    n_keep = min(k * acts.shape[:-1].numel(), flat.numel())
    top = torch.topk(flat, n_keep, sorted=False)
    dense = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(acts.shape)
    return sparse_rows(dense)


def threshold_code(pre: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, ""]) -> SparseCode:
    """JumpReLU with one global threshold: keep pre-activations above ``max(threshold, 0)``.

    Args:
        pre: Pre-activations.
        threshold: Scalar threshold (BatchTopK's learned inference threshold).
    """
    keep = pre > threshold.clamp(min=0).to(pre.dtype)
    return sparse_rows(torch.where(keep, pre, torch.zeros_like(pre)))


def sparse_rows(dense: Float[Tensor, "*batch d_sae"]) -> SparseCode:
    """Index/value lists of an arbitrary dense code (e.g. one a hook has edited).

    Args:
        dense: Code with any number of nonzeros per row (any sign).
    """
    n_active = int((dense != 0).sum(-1).max()) if dense.numel() else 0
    n_active = max(n_active, 1)  # keep a non-empty last axis so shapes stay regular
    # Largest |value| first puts every nonzero inside the first n_active slots.
    indices = torch.topk(dense.abs(), n_active, dim=-1, sorted=False).indices
    return SparseCode(dense, indices, dense.gather(-1, indices))
