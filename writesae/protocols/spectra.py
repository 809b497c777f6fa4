"""Spectral audit of the recurrent states (paper §6.6, §6.11a): how close to rank-1 is each head's memory?

For every (layer, head) cell, over every position of a set of sequences, the singular values
``sigma_1 >= sigma_2 >= ...`` of the state ``S_t`` give

- ``sigma_1 / sigma_2``: the gap of the leading direction (the paper's 12 / 6.8 / 3.0 at Qwen3.5-0.8B
  L1 / L9 / L17, head 4);
- the effective rank ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` (Roy & Vetterli): 1 for a
  rank-1 state, ``min(d_k, d_v)`` for a flat spectrum;
- the stable rank ``||S||_F^2 / sigma_1^2`` and its inverse, the top-1 singular variance (the paper's
  DeltaNet L12 H8: stable rank 1.023, 97.79%);

each aggregated over positions (median by default: the paper does not say). Besides the states,
the write-reuse score ``1 / sqrt(erank(C_k) erank(C_u))`` (the released code's write-geometry score;
not in the paper) measures how few directions the unit write factors ``k_t`` and ``u_t`` span: 1
when every write uses one key and one value direction, ``1 / sqrt(d_k d_v)`` when they are spread
evenly; ``C`` is their second-moment matrix by default (``reuse_moment``). The effective rank of the
covariance of ``vec(S_t)`` over positions (the paper's 70.2 vs 74.7 corpus check) is reported too.

No SAE is involved. One unit per layer (one forward pass per batch of sequences, with only that
layer's state hooks live), one record per head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, token_fingerprint, unit_generator

__all__ = [
    "PAPER_REFERENCE",
    "Spectra",
    "SpectraConfig",
    "SpectrumRecord",
    "covariance_eigenvalues",
    "effective_rank",
    "run_spectra",
    "stable_rank",
    "state_spectrum_stats",
    "write_reuse",
]

PAPER_REFERENCE = {
    "table": "§6.6 / Table 7 header; §6.11a spectral audit",
    "model": "Qwen3.5-0.8B GDN head 4 (L1, L9, L17); DeltaNet-1.3B L12 H8",
    "value": "sigma1/sigma2 ≈ 12 (L1), 6.8 (L9), 3.0 (L17); DeltaNet L12 H8 stable rank 1.023 "
    "(top-1 variance 97.79%)",
}


@dataclass
class SpectraConfig:
    """Choices of the spectral audit (docs/design.md §5).

    Attributes:
        layers: Recurrent layers audited (None: every one).
        heads: Heads audited in each layer (None: every one).
        skip_first: Leading positions left out: the state at position ``p`` has rank at most
            ``p + 1``, so ``sigma_2 = 0`` at position 0 (the paper uses every position of 1,024-token
            blocks, where the first ones weigh nothing).
        aggregate: How per-position values become one per head: ``"median"`` or ``"mean"`` (the
            paper does not say).
        reuse_moment: Matrix of the unit write factors whose effective rank enters the write-reuse
            score: ``"second_moment"`` (``E[k k^T]``; one repeated direction scores exactly 1) or
            ``"covariance"`` (centred, the released script's reading; a repeated direction has no
            covariance and scores 1 by convention).
        covariance_samples: States per head (a seeded uniform sample of positions) whose ``vec(S_t)``
            covariance spectrum is reported; 0 skips it (the paper's corpus check uses its training set).
        batch_size: Sequences traced at once (memory: ``batch_size x pos x heads x d_k x d_v``).
        seed: Seed of the covariance sample.
    """

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    skip_first: int = 1
    aggregate: Literal["median", "mean"] = "median"
    reuse_moment: Literal["second_moment", "covariance"] = "second_moment"
    covariance_samples: int = 1024
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_config(self, positive=("batch_size",), nonnegative=("skip_first", "covariance_samples"))


@dataclass
class SpectrumRecord:
    """One head's spectra, aggregated over positions (``aggregate``).

    Attributes:
        layer: Layer.
        head: Head.
        n_states: States (positions) audited.
        sigma1: Largest singular value of ``S_t``.
        sigma2: Second largest.
        sigma1_over_sigma2: ``sigma_1 / sigma_2`` (aggregated per position, not a ratio of aggregates).
        sigma1_over_sigma2_q25: Its 25th percentile over positions.
        sigma1_over_sigma2_q75: Its 75th percentile.
        effective_rank: ``exp`` of the entropy of the normalised singular values.
        stable_rank: ``||S_t||_F^2 / sigma_1^2``.
        top1_variance: ``sigma_1^2 / ||S_t||_F^2``.
        key_effective_rank: Effective rank of the unit key factors' moment matrix.
        value_effective_rank: Same for the unit value factors.
        write_reuse: ``1 / sqrt(key_effective_rank * value_effective_rank)``.
        state_covariance_erank: Effective rank of the covariance of ``vec(S_t)`` over the sampled
            positions (its eigenvalues), or None when skipped.
        state_covariance_ratio: Ratio of that covariance's two largest eigenvalues, or None.
    """

    layer: int
    head: int
    n_states: int
    sigma1: float
    sigma2: float
    sigma1_over_sigma2: float
    sigma1_over_sigma2_q25: float
    sigma1_over_sigma2_q75: float
    effective_rank: float
    stable_rank: float
    top1_variance: float
    key_effective_rank: float
    value_effective_rank: float
    write_reuse: float
    state_covariance_erank: float | None
    state_covariance_ratio: float | None


# ---------------------------------------------------------------------- the measures


def effective_rank(values: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """``exp(-sum p_i log p_i)`` with ``p = values / sum(values)`` (nonnegative values; 0 log 0 = 0).

    >>> round(float(effective_rank(torch.tensor([1.0, 1.0, 0.0]))), 6)
    2.0
    """
    total = values.sum(-1, keepdim=True)
    p = values / total.clamp(min=torch.finfo(values.dtype).tiny)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.ones_like(entropy))


def stable_rank(singular_values: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """``sum sigma_i^2 / sigma_1^2`` of descending singular values (1 for rank 1)."""
    squares = singular_values.square()
    return squares.sum(-1) / squares[..., 0].clamp(min=torch.finfo(squares.dtype).tiny)


def state_spectrum_stats(states: Float[Tensor, "n d_k d_v"]) -> dict[str, Float[Tensor, " n"]]:
    """Per-state ``sigma1``, ``sigma2``, their ratio, effective rank, stable rank and top-1 variance."""
    sigma = torch.linalg.svdvals(states.double())
    second = sigma[:, 1] if sigma.shape[1] > 1 else torch.zeros_like(sigma[:, 0])
    stable = stable_rank(sigma)
    return {
        "sigma1": sigma[:, 0],
        "sigma2": second,
        "sigma1_over_sigma2": sigma[:, 0] / second,  # inf where the state is rank 1
        "effective_rank": effective_rank(sigma),
        "stable_rank": stable,
        "top1_variance": 1 / stable,
    }


def moment_effective_rank(x: Float[Tensor, "n d"], moment: str) -> float:
    """Effective rank of the eigenvalues of ``x``'s second-moment (or, ``"covariance"``, centred) matrix."""
    x = x.double()
    if moment == "covariance":
        centred = x - x.mean(0)
        # Identical rows (up to float32 rounding, ~1e-7) leave only noise, whose spread says nothing about reuse.
        if float(centred.square().sum()) <= 1e-12 * max(float(x.square().sum()), 1e-300):
            return 1.0
        x = centred
    eigenvalues = torch.linalg.svdvals(x).square() / max(x.shape[0], 1)
    return float(effective_rank(eigenvalues))


def covariance_eigenvalues(x: Float[Tensor, "n d"]) -> Float[Tensor, " m"]:
    """Descending eigenvalues of the sample covariance of the rows of ``x`` (through the smaller Gram matrix)."""
    centred = x.double() - x.double().mean(0)
    gram = centred @ centred.T if centred.shape[0] <= centred.shape[1] else centred.T @ centred
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0) / max(x.shape[0] - 1, 1)


def write_reuse(
    keys: Float[Tensor, "n d_k"], values: Float[Tensor, "n d_v"], moment: str = "second_moment"
) -> tuple[float, float, float]:
    """``(score, key erank, value erank)``: ``score = 1 / sqrt(erank(C_k) erank(C_u))`` of the unit factors."""
    unit = torch.nn.functional.normalize
    key_rank = moment_effective_rank(unit(keys.double(), dim=-1), moment)
    value_rank = moment_effective_rank(unit(values.double(), dim=-1), moment)
    return 1 / float(np.sqrt(key_rank * value_rank)), key_rank, value_rank


def _aggregate(values: Tensor, how: str) -> float:
    finite = values[torch.isfinite(values)] if how == "mean" else values
    if finite.numel() == 0:
        return float("nan")
    return float(finite.mean() if how == "mean" else finite.median())


# ---------------------------------------------------------------------- the protocol


class Spectra(Protocol[SpectrumRecord]):
    """The spectral audit (run it with `run_protocol`, or `run_spectra`).

    Args:
        model: The hooked model.
        tokens: Sequences ``[batch, pos]`` without padding.
        config: Protocol choices.
    """

    name, title, record_type = "spectra", "Spectral audit of the recurrent states", SpectrumRecord

    def __init__(self, model: Any, tokens: Int[Tensor, "batch pos"], *, config: SpectraConfig | None = None) -> None:
        self.model, self.tokens = model, tokens
        self.config = config = config or SpectraConfig()
        cfg = model.cfg
        if not cfg.recurrent_layers:
            raise ValueError(
                f"{cfg.model_name} has no matrix-recurrent layers (layer types {cfg.layer_types}): nothing to audit"
            )
        self.layers = list(cfg.recurrent_layers if config.layers is None else config.layers)
        bad = [l for l in self.layers if l not in cfg.recurrent_layers]
        if bad:
            raise ValueError(
                f"layers {bad} are not matrix-recurrent; recurrent layers of {cfg.model_name}: {cfg.recurrent_layers}"
            )
        self.heads = list(range(cfg.n_heads) if config.heads is None else config.heads)
        if any(not 0 <= h < cfg.n_heads for h in self.heads):
            raise ValueError(f"heads {self.heads} out of range: {cfg.model_name} has heads 0..{cfg.n_heads - 1}")
        if tokens.shape[1] <= config.skip_first:
            raise ValueError(
                f"sequences of {tokens.shape[1]} tokens leave no position after skip_first={config.skip_first}"
            )

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "tokens": token_fingerprint(self.tokens),
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[SpectrumRecord]]]]:
        for layer in self.layers:
            yield f"layer-{layer}", lambda layer=layer: self._layer(layer)

    @torch.no_grad()
    def _layer(self, layer: int) -> list[SpectrumRecord]:
        config, model = self.config, self.model
        n, length = self.tokens.shape
        skip = config.skip_first
        names = {n_: model.cfg.hook_name(layer, n_) for n_ in ("hook_state", "hook_write_key", "hook_write_value")}
        # A seeded uniform sample of (sequence, position) pairs for the covariance spectrum.
        total = n * (length - skip)
        generator = unit_generator(config.seed, f"layer-{layer}")
        picked = torch.randperm(total, generator=generator)[: config.covariance_samples]
        chosen = torch.zeros(n, length - skip, dtype=torch.bool)
        chosen.view(-1)[picked] = True
        stats: dict[int, dict[str, list[Tensor]]] = {h: {} for h in self.heads}
        keys: dict[int, list[Tensor]] = {h: [] for h in self.heads}
        values: dict[int, list[Tensor]] = {h: [] for h in self.heads}
        sampled: dict[int, list[Tensor]] = {h: [] for h in self.heads}
        for first in range(0, n, config.batch_size):
            rows = slice(first, first + config.batch_size)
            _, cache = model.run_with_cache(
                self.tokens[rows], names_filter=list(names.values()), return_cache_object=False
            )
            states = cache[names["hook_state"]][:, skip:]  # [b, pos, head, d_k, d_v]
            for h in self.heads:
                s = states[:, :, h].float().cpu()
                for key, value in state_spectrum_stats(s.flatten(0, 1)).items():
                    stats[h].setdefault(key, []).append(value)
                keys[h].append(cache[names["hook_write_key"]][:, skip:, h].flatten(0, 1).float().cpu())
                values[h].append(cache[names["hook_write_value"]][:, skip:, h].flatten(0, 1).float().cpu())
                sampled[h].append(s[chosen[rows]].flatten(1))
            del cache, states
        records = []
        for h in self.heads:
            per = {key: torch.cat(v) for key, v in stats[h].items()}
            ratio = per["sigma1_over_sigma2"]
            reuse, key_rank, value_rank = write_reuse(torch.cat(keys[h]), torch.cat(values[h]), config.reuse_moment)
            cov_rank = cov_ratio = None
            sample = torch.cat(sampled[h]).double()
            if sample.shape[0] >= 2:
                eigenvalues = covariance_eigenvalues(sample)
                cov_rank = float(effective_rank(eigenvalues))
                if len(eigenvalues) > 1 and eigenvalues[1] > 0:
                    cov_ratio = float(eigenvalues[0] / eigenvalues[1])
            records.append(SpectrumRecord(
                layer=layer, head=h, n_states=int(ratio.numel()),
                sigma1=_aggregate(per["sigma1"], config.aggregate),
                sigma2=_aggregate(per["sigma2"], config.aggregate),
                sigma1_over_sigma2=_aggregate(ratio, config.aggregate),
                sigma1_over_sigma2_q25=float(ratio.quantile(0.25)),
                sigma1_over_sigma2_q75=float(ratio.quantile(0.75)),
                effective_rank=_aggregate(per["effective_rank"], config.aggregate),
                stable_rank=_aggregate(per["stable_rank"], config.aggregate),
                top1_variance=_aggregate(per["top1_variance"], config.aggregate),
                key_effective_rank=key_rank, value_effective_rank=value_rank, write_reuse=reuse,
                state_covariance_erank=cov_rank, state_covariance_ratio=cov_ratio,
            ))  # fmt: skip
        return records

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[SpectrumRecord]) -> dict[str, Any]:
        layers = sorted({r.layer for r in records})
        per_layer = []
        for layer in layers:
            rows = [r for r in records if r.layer == layer]
            per_layer.append({
                "layer": layer,
                "n_heads": len(rows),
                **{key: _median([getattr(r, key) for r in rows]) for key in _MEASURES},
            })  # fmt: skip
        headline: dict[str, Any] = {
            "n_cells": len(records),
            "median_sigma1_over_sigma2": _median([r.sigma1_over_sigma2 for r in records]),
            "median_effective_rank": _median([r.effective_rank for r in records]),
            "median_stable_rank": _median([r.stable_rank for r in records]),
            "median_write_reuse": _median([r.write_reuse for r in records]),
        }
        if records:
            sharpest = min(records, key=lambda r: r.stable_rank)
            headline["most_rank1_cell"] = f"L{sharpest.layer} H{sharpest.head}"
            headline["most_rank1_stable_rank"] = sharpest.stable_rank
        for row in per_layer:
            headline[f"L{row['layer']}_sigma1_over_sigma2"] = row["sigma1_over_sigma2"]
        return {
            "headline": headline,
            "aggregate": self.config.aggregate,
            "layers": per_layer,
            "paper_reference": PAPER_REFERENCE,
        }

    def report(self, summary: dict[str, Any], records: list[SpectrumRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Results", "No cells audited.")]
        h = summary["headline"]
        ref = PAPER_REFERENCE
        sections.append((
            "Headline",
            (f"Over {h['n_cells']} cells ({summary['aggregate']} over positions): sigma1/sigma2 "
            f"**{h['median_sigma1_over_sigma2']:.3g}**, effective rank {h['median_effective_rank']:.3g}, stable rank "
            f"{h['median_stable_rank']:.3g}, write reuse {h['median_write_reuse']:.3g} (medians over cells). "
            f"Most rank-1 cell: {h['most_rank1_cell']} (stable rank {h['most_rank1_stable_rank']:.3g}).\n\n"
            f"Paper ({ref['table']}, {ref['model']}; a different model): {ref['value']}."),
        ))  # fmt: skip
        per_layer = markdown_table(summary["layers"], ["layer", "n_heads", *_MEASURES])
        sections.append(("Per layer (median over heads)", per_layer))
        rows = [asdict(r) for r in records]
        sections.append(("Layers x heads", markdown_table(rows, ["layer", "head", "n_states", *_MEASURES,
                                                                   "state_covariance_erank"])))  # fmt: skip
        return sections

    def plots(self, summary: dict[str, Any], records: list[SpectrumRecord], plt: Any) -> dict[str, Any]:
        layers = sorted({r.layer for r in records})
        heads = sorted({r.head for r in records})
        panels = (("sigma1_over_sigma2", "sigma1 / sigma2 (log10)", True), ("effective_rank", "effective rank", False),
                  ("stable_rank", "stable rank", False), ("write_reuse", "write reuse", False))  # fmt: skip
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.45 * len(layers) + 1.8))
        for ax, (key, label, log) in zip(axes, panels):
            grid = np.full((len(layers), len(heads)), np.nan)
            for r in records:
                value = getattr(r, key)
                if value is not None and np.isfinite(value) and (value > 0 or not log):
                    grid[layers.index(r.layer), heads.index(r.head)] = np.log10(value) if log else value
            image = ax.imshow(grid, aspect="auto", cmap="viridis")
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(label, fontsize=9)
            ax.set_xticks(range(len(heads)), [str(h) for h in heads], fontsize=7)
            ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=7)
            ax.set_xlabel("head")
        fig.tight_layout()
        return {"spectra.png": fig}


_MEASURES = ("sigma1_over_sigma2", "effective_rank", "stable_rank", "top1_variance", "write_reuse")


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(kept)) if kept else None


def run_spectra(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: SpectraConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
) -> ProtocolResult[SpectrumRecord]:
    """Audit the spectra of every (layer, head) state of a model on some sequences.

    Args:
        model: The hooked model.
        tokens: Sequences ``[batch, pos]`` without padding.
        config: Protocol choices (`SpectraConfig`).
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the layers.

    Returns:
        One `SpectrumRecord` per cell and the summary (``summary["headline"]``).
    """
    return run_protocol(Spectra(model, tokens, config=config), out_dir, mode=mode, verbose=verbose)
