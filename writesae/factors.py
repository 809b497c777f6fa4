"""Algebra of rank-r matrix atoms kept as factors.

An atom is ``A_i = sum_r v_ir w_ir^T`` with key factors ``v_ir`` (length ``d_k``) and value factors
``w_ir`` (length ``d_v``); the factor tensors are ``key_f [n, r, d_k]`` and ``value_f [n, r, d_v]``.
These helpers compute scores, reconstructions and inner products from the factors, so that nothing of
size ``d_k * d_v`` per atom or per sample is built unless a function says so. All functions take one
flat batch axis ``b``; callers flatten their leading axes first.

Two identities carry most of the work (``<A, B> = sum_ij A_ij B_ij``, the Frobenius inner product):

- ``<k u^T, v w^T> = (v . k) (w . u)``: a rank-1 input scored against a rank-1 atom costs ``d_k + d_v``.
- ``<v w^T, v' w'^T> = (v . v') (w . w')``: the squared norm of ``sum_j a_j A_j`` is ``a^T G a`` with the
  Gram matrix ``G`` of the active atoms, ``K^2 (d_k + d_v)`` per sample instead of ``K d_k d_v``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Largest intermediate (in elements) a chunked helper builds at once: 64 MiB of float32.
_CHUNK_ELEMENTS = 1 << 24


def unit_rows(x: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows d"]:
    """``x`` with every row (last axis) scaled to unit L2 norm; zero rows stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def atom_matrices(
    key_f: Float[Tensor, "n r d_k"], value_f: Float[Tensor, "n r d_v"]
) -> Float[Tensor, "n d_k d_v"]:
    """Dense atoms ``sum_r v_ir w_ir^T`` (``n * d_k * d_v`` elements: build only what you need)."""
    return torch.einsum("nrk,nrv->nkv", key_f, value_f)


def bilinear_scores(
    states: Float[Tensor, "b d_k d_v"],
    key_f: Float[Tensor, "n r d_k"],
    value_f: Float[Tensor, "n r d_v"],
) -> Float[Tensor, "b n"]:
    """Matched-filter scores ``sum_r v_ir^T S w_ir`` of dense states.

    Two orders, chosen by batch size: for many states, build the ``[n, d_k * d_v]`` filter bank once
    and use one matmul; for a few (e.g. one token during generation), contract each state with the
    value factors first, which builds ``b * n * r * d_k`` elements instead of the whole bank.
    """
    b, d_k, d_v = states.shape
    n, r, _ = key_f.shape
    if b * min(d_k, d_v) >= d_k * d_v:
        bank = atom_matrices(key_f, value_f).reshape(n, d_k * d_v)
        return states.reshape(b, d_k * d_v) @ bank.T
    # S w_ir: [b, d_k, n*r], then dot with v_ir over d_k.
    sw = states @ value_f.reshape(n * r, d_v).T
    return (sw.reshape(b, d_k, n, r) * key_f.permute(2, 0, 1)).sum(dim=(1, 3))


def bilinear_scores_rank1(
    key: Float[Tensor, "b d_k"],
    value: Float[Tensor, "b d_v"],
    key_f: Float[Tensor, "n r d_k"],
    value_f: Float[Tensor, "n r d_v"],
) -> Float[Tensor, "b n"]:
    """Scores ``<k u^T, A_i> = sum_r (v_ir . k)(w_ir . u)`` of rank-1 inputs, without forming ``k u^T``."""
    n, r, d_k = key_f.shape
    kv = key @ key_f.reshape(n * r, d_k).T
    uw = value @ value_f.reshape(n * r, -1).T
    return (kv * uw).reshape(-1, n, r).sum(-1)


def dense_scores_rank1(
    key: Float[Tensor, "b d_k"], value: Float[Tensor, "b d_v"], w_enc: Float[Tensor, "d_in n"]
) -> Float[Tensor, "b n"]:
    """Scores ``k^T W_i u`` of rank-1 inputs against a dense encoder (``W_i`` = column i as ``[d_k, d_v]``).

    A dense encoder has no shortcut: every route costs ``d_k * d_v`` per atom and sample. Contracting
    ``k^T W_i u`` directly needs a ``[b, d_v, n]`` intermediate, larger than the writes themselves
    whenever ``n > d_k``; so the writes are built here, a chunk of at most 64 MiB at a time, and sent
    through one matmul (same flops, ``d_v * n / d_in`` times less memory).
    """
    d_k, d_v = key.shape[-1], value.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // (d_k * d_v))
    out = [
        (key[i : i + step, :, None] * value[i : i + step, None, :]).reshape(-1, d_k * d_v) @ w_enc
        for i in range(0, key.shape[0], step)
    ]
    return torch.cat(out) if out else key.new_zeros(0, w_enc.shape[-1])


def decode_gathered(
    values: Float[Tensor, "b K"],
    key_g: Float[Tensor, "b K r d_k"],
    value_g: Float[Tensor, "b K r d_v"],
) -> Float[Tensor, "b d_k d_v"]:
    """``sum_j a_j A_j`` from gathered factors of the active atoms (one ``bmm`` over ``K * r``)."""
    b, kk, r, d_k = key_g.shape
    scaled = (key_g * values[:, :, None, None]).reshape(b, kk * r, d_k)
    return torch.bmm(scaled.transpose(1, 2), value_g.reshape(b, kk * r, -1))


def decode_dense_code(
    dense: Float[Tensor, "b n"],
    indices: Int[Tensor, "b K"],
    key_f: Float[Tensor, "n r d_k"],
    value_f: Float[Tensor, "n r d_v"],
) -> Float[Tensor, "b d_k d_v"]:
    """``sum_i a_i A_i`` of a dense code whose nonzero entries are at ``indices``.

    The forward touches the active atoms only (``decode_gathered``). The backward gives every code
    entry its gradient ``<G, A_i>``, active or not, as a dense decoder ``a @ W_dec`` would (what
    attribution through SAE features needs); the factors get the gradient of the active atoms.
    """
    return _DenseCodeDecode.apply(dense, indices, key_f, value_f)


class _DenseCodeDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dense, indices, key_f, value_f):  # noqa: ANN001, ANN205 - autograd signature
        values = dense.gather(-1, indices)
        ctx.save_for_backward(indices, values, key_f, value_f)
        return decode_gathered(values, key_f[indices], value_f[indices])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        indices, values, key_f, value_f = ctx.saved_tensors
        grad_dense = grad_key = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_dense = bilinear_scores(grad, key_f, value_f)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # d/dv_jr = a_j G w_jr and d/dw_jr = a_j G^T v_jr, summed over the samples using atom j.
            key_g, value_g = key_f[indices], value_f[indices]
            scale = values[:, :, None, None]
            flat = indices.reshape(-1)
            grad_key = torch.zeros_like(key_f).index_add_(
                0, flat, (scale * torch.einsum("bkv,bjrv->bjrk", grad, value_g)).flatten(0, 1)
            )
            grad_value = torch.zeros_like(value_f).index_add_(
                0, flat, (scale * torch.einsum("bkv,bjrk->bjrv", grad, key_g)).flatten(0, 1)
            )
        return grad_dense, None, grad_key, grad_value


def gather_factors(
    indices: Int[Tensor, "b K"], key_f: Float[Tensor, "n r d_k"], value_f: Float[Tensor, "n r d_v"]
) -> tuple[Float[Tensor, "b K r d_k"], Float[Tensor, "b K r d_v"]]:
    """Factors of the atoms named by ``indices``."""
    return key_f[indices], value_f[indices]


def rank1_inner(
    key: Float[Tensor, "b d_k"],
    value: Float[Tensor, "b d_v"],
    key_g: Float[Tensor, "b K r d_k"],
    value_g: Float[Tensor, "b K r d_v"],
) -> Float[Tensor, "b K"]:
    """``<k u^T, A_j> = sum_r (v_jr . k)(w_jr . u)`` for gathered atoms."""
    kv = torch.einsum("bjrk,bk->bjr", key_g, key)
    uw = torch.einsum("bjrv,bv->bjr", value_g, value)
    return (kv * uw).sum(-1)


def cross_gram(
    key_a: Float[Tensor, "b Ka r d_k"],
    value_a: Float[Tensor, "b Ka r d_v"],
    key_b: Float[Tensor, "b Kb r d_k"],
    value_b: Float[Tensor, "b Kb r d_v"],
) -> Float[Tensor, "b Ka Kb"]:
    """Per-sample Gram ``<A_j, B_l> = sum_{r,s} (v_jr . v'_ls)(w_jr . w'_ls)`` between two atom sets."""
    b, ka, r, d_k = key_a.shape
    kb = key_b.shape[1]
    gk = torch.bmm(key_a.reshape(b, ka * r, d_k), key_b.reshape(b, kb * r, d_k).transpose(1, 2))
    gv = torch.bmm(
        value_a.reshape(b, ka * r, -1), value_b.reshape(b, kb * r, -1).transpose(1, 2)
    )
    return (gk * gv).reshape(b, ka, r, kb, r).sum(dim=(2, 4))


def quadratic_form(
    values_a: Float[Tensor, "b Ka"], gram: Float[Tensor, "b Ka Kb"], values_b: Float[Tensor, "b Kb"]
) -> Float[Tensor, " b"]:
    """``a^T G b`` per sample."""
    return torch.einsum("bj,bjl,bl->b", values_a, gram, values_b)


def atom_offset_inner(
    key_f: Float[Tensor, "n r d_k"], value_f: Float[Tensor, "n r d_v"], offset: Float[Tensor, "d_k d_v"]
) -> Float[Tensor, " n"]:
    """``<A_i, C> = sum_r v_ir^T C w_ir`` for every atom and one fixed matrix ``C``."""
    return torch.einsum("nrk,kv,nrv->n", key_f, offset, value_f)


def atom_frobenius_norms(
    key_f: Float[Tensor, "n r d_k"], value_f: Float[Tensor, "n r d_v"]
) -> Float[Tensor, " n"]:
    """``||sum_r v_ir w_ir^T||_F`` per atom, via the r x r factor Grams (exact for any rank)."""
    gk = key_f @ key_f.transpose(1, 2)
    gv = value_f @ value_f.transpose(1, 2)
    return (gk * gv).sum(dim=(1, 2)).clamp(min=0).sqrt()


def gram_is_cheaper(n_atoms: int, rank: int, d_k: int, d_v: int) -> bool:
    """Whether Gram algebra beats building the ``d_k x d_v`` matrix for ``n_atoms`` rank-r atoms.

    Per sample the Gram costs ``(n r)^2 (d_k + d_v)`` and the dense sum ``n r d_k d_v``, so the Gram
    wins while ``n r (d_k + d_v) <= d_k d_v`` (for 128 x 128 heads: up to 64 rank-1 atoms).
    """
    return n_atoms * rank * (d_k + d_v) <= d_k * d_v
