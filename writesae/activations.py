"""TopK, BatchTopK, JumpReLU and gated codes, returned both dense and as per-row (index, value) lists.

The decoder of a factor-form SAE never needs the dense ``[..., d_sae]`` code: it gathers the few active
atoms. So each rule returns a ``SparseCode``: the dense code (what SAELens' hooks see) plus ``indices`` and
``values`` of shape ``[..., n_active]``. ``n_active`` is ``k`` for TopK; for BatchTopK and thresholds it is
the largest number of active atoms of any row, and shorter rows are padded with zero values (padding
indices point at some inactive atom, so they add nothing).

JumpReLU (Rajamanoharan et al. 2024, "Jumping ahead") keeps ``z_i`` where it exceeds a per-atom threshold
``theta_i``. Its step has no useful derivative, so training uses straight-through estimators whose
threshold gradients are those of the step smoothed by a rectangle kernel of bandwidth ``h``:
``H_h(x) = clamp(x / h + 1/2, 0, 1)``, whose derivative is ``rect(x / h) / h`` with
``rect(u) = 1[|u| < 1/2]``. `jumprelu` passes ``z``'s gradient where the atom is active and gives
``theta`` ``-(theta / h) rect((z - theta) / h)``; `heaviside` (the L0 penalty's step) gives ``theta``
``-rect((z - theta) / h) / h`` and ``z`` nothing, so the L0 penalty moves only the thresholds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


def _rect(x: Tensor, bandwidth: float) -> Tensor:
    """``rect(x / h) / h``: the rectangle kernel of bandwidth ``h``, as a density."""
    return ((x / bandwidth).abs() < 0.5).to(x.dtype) / bandwidth


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` summed over the leading axes that broadcasting added to ``like``."""
    return grad.reshape(-1, *like.shape).sum(0) if grad.shape != like.shape else grad


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = _sum_to(-threshold * _rect(pre - threshold, ctx.bandwidth) * grad, threshold)
        return grad_pre, grad_threshold, None


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = _sum_to(-_rect(pre - threshold, ctx.bandwidth) * grad, threshold)
        return None, grad_threshold, None


def jumprelu(
    pre: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """``z * 1[z > theta]``, with the straight-through gradients of the module docstring.

    Args:
        pre: Pre-activations ``z``.
        threshold: Per-atom thresholds ``theta > 0``.
        bandwidth: Kernel bandwidth ``h`` (used by the backward pass only).
    """
    return _JumpReLU.apply(pre, threshold, bandwidth)


def heaviside(
    pre: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """``1[z > theta]``; its gradient goes to ``theta`` only (module docstring), as an L0 penalty's should.

    Args:
        pre: Pre-activations ``z``.
        threshold: Per-atom thresholds ``theta``.
        bandwidth: Kernel bandwidth ``h`` (used by the backward pass only).
    """
    return _Heaviside.apply(pre, threshold, bandwidth)


def jumprelu_code(
    pre: Float[Tensor, "*batch d_sae"], log_threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> SparseCode:
    """JumpReLU with per-atom thresholds ``theta = exp(log_threshold)``.

    Args:
        pre: Pre-activations.
        log_threshold: Per-atom log thresholds (the learned parameter).
        bandwidth: Kernel bandwidth of the straight-through gradients.
    """
    return sparse_rows(jumprelu(pre, log_threshold.exp(), bandwidth))


def gate_magnitudes(
    pre: Float[Tensor, "*batch d_sae"],
    b_gate: Float[Tensor, " d_sae"],
    r_mag: Float[Tensor, " d_sae"],
    b_mag: Float[Tensor, " d_sae"],
) -> Float[Tensor, "*batch d_sae"]:
    """A gated SAE's magnitude pre-activations from its gate pre-activations.

    ``pi_gate = s + b_gate`` and ``pi_mag = exp(r_mag) s + b_mag`` share the encoder's score ``s``
    (Rajamanoharan et al. 2024, "Improving dictionary learning with gated SAEs"), so
    ``pi_mag = exp(r_mag) (pi_gate - b_gate) + b_mag``.
    """
    return r_mag.exp() * (pre - b_gate) + b_mag


def gated_code(
    pre: Float[Tensor, "*batch d_sae"],
    b_gate: Float[Tensor, " d_sae"],
    r_mag: Float[Tensor, " d_sae"],
    b_mag: Float[Tensor, " d_sae"],
) -> SparseCode:
    """Gated code ``1[pi_gate > 0] * ReLU(pi_mag)`` (the hard gate: no gradient reaches the gate path).

    Args:
        pre: Gate pre-activations ``pi_gate``.
        b_gate: Gate bias (the SAE's ``b_enc``).
        r_mag: Per-atom log scale of the magnitude path.
        b_mag: Magnitude bias.
    """
    magnitude = gate_magnitudes(pre, b_gate, r_mag, b_mag).relu()
    return sparse_rows(torch.where(pre > 0, magnitude, torch.zeros_like(magnitude)))
