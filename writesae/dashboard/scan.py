"""One streaming pass over a token source: everything a dashboard counts per atom.

Batch by batch, the SAE's cell is traced (write factors, read queries, gates, and the states for an
SAE on states), the codes are computed, and per-atom accumulators absorb them. Nothing of size
``positions x d_sae`` outlives a batch, so the memory is set by the batch and the SAE, not by the
number of tokens (``benchmarks/bench_dashboard.py`` measures it).

Per atom the pass keeps:

- firing count, sum and maximum of the code, and its histogram (`GrowingHistograms`);
- the top-k firing contexts, with the atom's code at every token of each window (`TopKContexts`);
- the top-k *retrieving* queries: positions where the read ``o_t = S_t^T q_t`` would take most of
  the atom out of the state, ``|A_i^T q_t|`` (for a rank-1 atom ``|v_i . q_t| |w_i|``): the key
  factor's side of the atom;
- the Frobenius cosine of the atom to the native write ``k_t u_t^T`` at each firing, as a histogram
  (the register / bundle split of the paper takes its median);
- the gate half-life after each firing: the number of tokens ``h`` until
  ``prod_{s=t+1..t+h} alpha_s <= 1/2``, as a histogram (firings too close to the end of their row
  to see the gate halve, or to pass ``max_horizon``, are left out). This is the decay of the
  closed-form logit shift; the delta rule's erase, which depends on the later keys, is in the exact
  linear response instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from writesae import factors as F
from writesae.protocols.cell import encode_trace, sae_cell, trace_cell

from .histogram import FixedHistograms, GrowingHistograms
from .topk import TopKContexts

__all__ = ["ScanConfig", "AtomScan", "scan_atoms", "gate_horizons", "retrieval_scores", "COSINE_EDGES"]

# Bins of the cosine histograms: 0.01 wide over [-1, 1].
COSINE_EDGES = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)


@dataclass
class ScanConfig:
    """How much the pass keeps per atom.

    Attributes:
        contexts: Top firing contexts kept per atom.
        queries: Top retrieving positions kept per atom.
        before: Tokens of context before each kept position.
        after: Tokens of context after it.
        histogram_bins: Bins of the activation histograms (a power of two).
        max_horizon: Longest gate half-life measured, in tokens.
        skip_first: Leave out the first positions of every row (their states hold one or two writes;
            the demo and the tutorials train without them).
        batch_size: Rows of the token source per forward pass.
    """

    contexts: int = 10
    queries: int = 5
    before: int = 12
    after: int = 3
    histogram_bins: int = 32
    max_horizon: int = 64
    skip_first: int = 1
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_horizon < 1 or self.batch_size < 1 or self.skip_first < 0:
            raise ValueError(
                f"need max_horizon >= 1, batch_size >= 1 and skip_first >= 0 (got {self.max_horizon}, "
                f"{self.batch_size}, {self.skip_first})"
            )


@dataclass
class AtomScan:
    """The accumulators after a pass (see the module docstring)."""

    n_positions: int
    count: Int[Tensor, " d_sae"]
    total: Float[Tensor, " d_sae"]
    peak: Float[Tensor, " d_sae"]
    histograms: GrowingHistograms
    contexts: TopKContexts
    queries: TopKContexts
    cosines: FixedHistograms
    horizons: FixedHistograms
    config: ScanConfig


def gate_horizons(
    log_decay: Float[Tensor, "batch pos"], level: float, max_horizon: int
) -> Int[Tensor, "batch pos"]:
    """Per position ``t``: the smallest ``h >= 1`` with ``sum_{s=t+1..t+h} log alpha_s <= log(level)``.

    ``max_horizon + 1`` when the product stays above ``level`` for ``max_horizon`` tokens; ``-1``
    when the row ends before either can be seen.
    """
    length = log_decay.shape[1]
    # -cumsum is non-decreasing (log alpha <= 0): the crossing is a sorted search.
    fall = -log_decay.double().cumsum(1)
    crossing = torch.searchsorted(fall, fall - math.log(level), right=False)  # first j with fall_j >= fall_t + log(1/level)
    horizon = crossing - torch.arange(length)
    room = length - 1 - torch.arange(length)  # tokens after t in the row
    beyond = torch.full_like(horizon, max_horizon + 1)
    unseen = (crossing >= length) & (room < max_horizon)
    horizon = torch.where((crossing >= length) | (horizon > max_horizon), beyond, horizon)
    return torch.where(unseen, torch.full_like(horizon, -1), horizon)


def retrieval_scores(
    query: Float[Tensor, "b d_k"], key_f: Float[Tensor, "n r d_k"], value_gram: Float[Tensor, "n r r"]
) -> Float[Tensor, "b n"]:
    """``|A_i^T q|``: the norm of what a read with query ``q`` takes out of atom ``A_i = sum_r v_ir w_ir^T``.

    Args:
        query: Read queries.
        key_f: Key factors ``v_ir``.
        value_gram: ``w_ir . w_is`` per atom (for unit rank-1 atoms, ones).
    """
    n, r, d_k = key_f.shape
    vq = (query @ key_f.reshape(n * r, d_k).T).reshape(-1, n, r)
    return torch.einsum("bnr,nrs,bns->bn", vq, value_gram, vq).clamp(min=0).sqrt()


@torch.no_grad()
def scan_atoms(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "rows pos"],
    config: ScanConfig | None = None,
    verbose: bool = True,
) -> AtomScan:
    """Run the model over ``tokens`` batch by batch and fill the per-atom accumulators.

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE with factor atoms (any variant but the dense-decoder ``"flat"`` and
            ``"bilinear_flat"``).
        tokens: The token source, one row per sequence (e.g. from `writesae.tokens.token_blocks`).
        config: What to keep.
        verbose: Progress bar.
    """
    config = config or ScanConfig()
    cell, kind = sae_cell(model, sae)
    n = sae.cfg.d_sae
    key_f = sae.atom_key.detach().float().cpu()
    value_f = sae.atom_value.detach().float().cpu()
    value_gram = value_f @ value_f.transpose(1, 2)
    atom_norms = F.atom_frobenius_norms(key_f, value_f).clamp(min=1e-12)
    scan = AtomScan(
        n_positions=0,
        count=torch.zeros(n, dtype=torch.long),
        total=torch.zeros(n, dtype=torch.float64),
        peak=torch.zeros(n),
        histograms=GrowingHistograms(n, config.histogram_bins),
        contexts=TopKContexts(n, config.contexts, config.before, config.after),
        queries=TopKContexts(n, config.queries, config.before, config.after, positive_only=False),
        cosines=FixedHistograms(n, COSINE_EDGES),
        horizons=FixedHistograms(n, torch.arange(config.max_horizon + 2, dtype=torch.float64) + 0.5),
        config=config,
    )
    rows = tokens.shape[0]
    for start in tqdm(range(0, rows, config.batch_size), disable=not verbose, desc="dashboard: scanning", unit="batch"):
        batch = tokens[start : start + config.batch_size]
        trace = trace_cell(model, batch.to(model.cfg.device), cell, with_states=kind == "state")
        codes = encode_trace(sae, trace, kind).float().cpu()
        codes[:, : config.skip_first] = 0
        valid = torch.ones(batch.shape, dtype=torch.bool)
        valid[:, : config.skip_first] = False
        scan.n_positions += int(valid.sum())

        b, t, a = codes.nonzero(as_tuple=True)
        values = codes[b, t, a]
        scan.count.index_add_(0, a, torch.ones_like(a))
        scan.total.index_add_(0, a, values.double())
        scan.peak.scatter_reduce_(0, a, values, "amax")
        scan.histograms.update(a, values)
        scan.contexts.update(codes, batch, start, valid)

        key, value = trace.key[b, t].float(), trace.value[b, t].float()
        inner = F.rank1_inner(key, value, key_f[a][:, None], value_f[a][:, None])[:, 0]
        scale = atom_norms[a] * key.norm(dim=-1) * value.norm(dim=-1)
        scan.cosines.update(a, inner / scale.clamp(min=1e-30))

        horizon = gate_horizons(trace.log_decay.float(), 0.5, config.max_horizon)[b, t]
        seen = horizon >= 0
        scan.horizons.update(a[seen], horizon[seen].double())

        query = trace.query.float().reshape(-1, key_f.shape[-1])
        scores = retrieval_scores(query, key_f, value_gram).reshape(*batch.shape, n)
        scan.queries.update(scores, batch, start, valid)
    return scan
