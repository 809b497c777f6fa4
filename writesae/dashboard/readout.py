"""What an atom's value factor writes toward the vocabulary.

A read of the state returns ``o_t = S_t^T q_t``; the part of it that atom ``A_i = v_i w_i^T`` supplies
is ``(v_i . q_t) w_i``, a multiple of the value factor. Sent through the head's columns of the
layer's output projection ``W_O[h]`` and the unembedding ``W_U``, ``w_i`` becomes a direction over
the vocabulary,

    logit_effect_i = W_U^T W_O[h] w_i        [d_vocab]

the tokens whose logits a retrieval of the atom raises (largest entries) or lowers (smallest). This
is the output path of the paper's closed-form logit shift (its Eq. 4, ``path="out_proj"`` in
`writesae.protocols.logit_shift`): it leaves out the gated norm between the read and ``W_O``, the
later layers and the final norm. The exact effect, all of those included, is the linear response
(`writesae.dashboard.response`). For a rank-r atom each value factor ``w_ir`` gets its own row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["ValueReadout", "value_readout"]


@dataclass
class ValueReadout:
    """Top and bottom vocabulary entries of every atom's value-factor logit effect.

    Attributes:
        top_tokens: ``[d_sae, rank, n]`` token ids with the largest effect, largest first.
        top_values: Their effects.
        bottom_tokens: ``[d_sae, rank, n]`` token ids with the smallest effect, smallest first.
        bottom_values: Their effects.
        histogram_counts: ``[d_sae, bins]`` histogram of each atom's (first factor's) effect over
            the whole vocabulary.
        histogram_edges: ``[d_sae, bins + 1]`` its bin edges (the effect's min to max).
    """

    top_tokens: Int[Tensor, "d_sae rank n"]
    top_values: Float[Tensor, "d_sae rank n"]
    bottom_tokens: Int[Tensor, "d_sae rank n"]
    bottom_values: Float[Tensor, "d_sae rank n"]
    histogram_counts: Int[Tensor, "d_sae bins"]
    histogram_edges: Float[Tensor, "d_sae edges"]


@torch.no_grad()
def value_readout(model: Any, sae: Any, layer: int, head: int, n_tokens: int = 10, bins: int = 24, chunk: int = 64) -> ValueReadout:
    """The logit effect ``W_U^T W_O[h] w_ir`` of every value factor, reduced to its extremes.

    Args:
        model: The hooked model.
        sae: The WriteSAE (factor atoms).
        layer: The SAE's layer.
        head: The SAE's head.
        n_tokens: Tokens kept at each end.
        bins: Bins of the per-atom histogram over the vocabulary.
        chunk: Atoms per matmul (bounds the ``[chunk * rank, d_vocab]`` intermediate).
    """
    path = model.W_U.detach().float().T @ model.mixer(layer).head_output_weight(head).detach().float()  # [d_vocab, d_v]
    value_f = sae.atom_value.detach().float().to(path.device)  # [n, r, d_v]
    n = value_f.shape[0]
    tops, top_ids, bottoms, bottom_ids, counts, edges = [], [], [], [], [], []
    for i in range(0, n, chunk):
        effect = value_f[i : i + chunk] @ path.T  # [c, r, d_vocab]
        high = effect.topk(n_tokens, dim=-1)
        low = effect.topk(n_tokens, dim=-1, largest=False)
        tops.append(high.values), top_ids.append(high.indices)
        bottoms.append(low.values), bottom_ids.append(low.indices)
        first = effect[:, 0]
        lo, hi = first.min(-1).values, first.max(-1).values
        step = ((hi - lo) / bins).clamp(min=1e-12)
        index = ((first - lo[:, None]) / step[:, None]).long().clamp(0, bins - 1)
        counts.append(torch.zeros(len(first), bins, dtype=torch.long, device=first.device).scatter_add_(1, index, torch.ones_like(index)))
        edges.append(lo[:, None] + step[:, None] * torch.arange(bins + 1, device=first.device))
    return ValueReadout(
        torch.cat(top_ids).cpu(), torch.cat(tops).cpu(), torch.cat(bottom_ids).cpu(), torch.cat(bottoms).cpu(),
        torch.cat(counts).cpu(), torch.cat(edges).cpu(),
    )
