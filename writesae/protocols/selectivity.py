"""Direction-space selectivity (paper §6.7, Figs. 9-10), with the controls that show what it cannot tell.

At a firing (a position ``t`` where an atom's code is nonzero) the head's state is perturbed by the
unit atom ``A_i`` times ``eps`` and, separately, by matched-norm rank-1 controls: a random rank-1
matrix (uniform key and value directions), a rank-1 matrix orthogonal to the atom (its key factor
orthogonal to the atom's key factors, its value factor to its value factors), and a second,
independent random one. Each perturbation changes the next-token logits; the *selectivity* of a
pair of perturbations at ``K`` is ``1 - |top_K(d_a) & top_K(d_b)| / K``, where ``top_K`` is the set
of the ``K`` tokens whose logits the perturbation raises most (``rank_by``).

The paper reports a mean selectivity of 0.9953 of atoms against controls, and notes that any
matched-norm rank-1 perturbation scores above 0.99: selectivity cannot tell an SAE atom from a
random one. The pair ``random|random`` (two independent random controls) measures exactly that
floor, and sits beside ``atom|random`` and ``atom|orthogonal`` in every summary. The cosine of the
two logit changes (centred over the vocabulary) is recorded as a continuous companion.

Why random pairs score high: a state perturbation ``v w^T`` changes the read at ``t`` by
``(q_t . v) w``, so the logit change is (to first order) a fixed map of the value factor ``w``,
scaled by ``q_t . v``. Two perturbations with unrelated value factors move unrelated tokens; two
with the same value factor and the same ``q_t . v`` move the logits identically (selectivity 0),
which the tests check on a constructed pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.edits import add_to_states
from writesae.config import has_factor_decoder

from .activity import Firing, scan_activity, select_firings
from .cell import Cell, sae_cell, trace_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, token_fingerprint, unit_generator
from .walk import SequenceWalk

__all__ = [
    "PAIRS",
    "PAPER_REFERENCE",
    "Selectivity",
    "SelectivityConfig",
    "SelectivityRecord",
    "orthogonal_rank1",
    "perturbation_logit_changes",
    "random_rank1",
    "run_selectivity",
    "topk_selectivity",
]

PAPER_REFERENCE = {
    "table": "Figs. 9-10 (App. I.1)",
    "model": "Qwen3.5-0.8B L1/L9/L17, all heads (47 cells)",
    "value": "mean selectivity 0.9953 (CI [0.9930, 0.9976]), 39/47 cells > 0.99; any matched-norm rank-1 "
    "perturbation scores > 0.99 (not diagnostic)",
}

PAIRS: tuple[str, ...] = ("atom|random", "atom|orthogonal", "random|random")
"""The compared pairs: the atom against each control, and two independent random controls (the floor)."""


@dataclass
class SelectivityConfig:
    """Choices of the selectivity protocol (docs/design.md §5).

    Attributes:
        ks: The ``K`` of the top-``K`` sets (paper: 1, 5, 10, 20, 30, 32).
        epsilon: Size of every perturbation (paper: eps = 1 on unit atoms).
        eps_scale: ``"absolute"``: the perturbation's Frobenius norm is ``epsilon`` (the paper's);
            ``"state_norm"``: ``epsilon`` times ``||S_t||_F`` at the firing; ``"write_norm"``:
            ``epsilon`` times the native write's norm there (small models' states are far below unit
            scale, where an absolute eps = 1 swamps them).
        rank_by: ``"increase"``: top-``K`` = the tokens whose logits rise most (the paper does not
            say); ``"absolute"``: largest ``|change|`` (a perturbation and its negation then agree).
        read_offset: The logits compared are those at ``t + read_offset`` (0: the next-token
            distribution at the firing, whose read sees the perturbed state).
        n_atoms: The most frequent atoms on the sequences (None: every atom that fires).
        max_firings_per_atom: Firings per atom (a seeded sample).
        seed: Seed of the firing sample and of the controls.
        scan_batch_size: Sequences encoded at once when scanning the codes.
    """

    ks: tuple[int, ...] = (1, 5, 10, 20, 30, 32)
    epsilon: float = 1.0
    eps_scale: Literal["absolute", "state_norm", "write_norm"] = "absolute"
    rank_by: Literal["increase", "absolute"] = "increase"
    read_offset: int = 0
    n_atoms: int | None = 50
    max_firings_per_atom: int = 5
    seed: int = 2026
    scan_batch_size: int = 8

    def __post_init__(self) -> None:
        check_config(self, positive=("ks", "epsilon", "n_atoms", "max_firings_per_atom", "scan_batch_size"),
                     nonnegative=("read_offset",), nonempty=("ks",))  # fmt: skip


@dataclass
class SelectivityRecord:
    """One firing's perturbations.

    Attributes:
        sequence: Sequence index.
        position: Firing position ``t``.
        atom: The firing atom.
        activation: Its code there.
        norm: Frobenius norm of every perturbation.
        selectivity: Per pair (`PAIRS`), the selectivity at each ``K`` of the config.
        logit_cosine: Per pair, the cosine of the two centred logit changes.
        change_norm: Per perturbation, the norm of its centred logit change.
    """

    sequence: int
    position: int
    atom: int
    activation: float
    norm: float
    selectivity: dict[str, list[float]]
    logit_cosine: dict[str, float]
    change_norm: dict[str, float]


# ---------------------------------------------------------------------- measures and controls


def topk_selectivity(
    change_a: Float[Tensor, " d_vocab"],
    change_b: Float[Tensor, " d_vocab"],
    ks: Iterable[int],
    rank_by: str = "increase",
) -> list[float]:
    """``1 - |top_K(a) & top_K(b)| / K`` for each ``K`` (``rank_by``: ``"increase"`` or ``"absolute"``).

    >>> topk_selectivity(torch.tensor([3.0, 2, 1, 0]), torch.tensor([3.0, 0, 1, 2]), [1, 2])
    [0.0, 0.5]
    """
    score_a, score_b = (change_a, change_b) if rank_by == "increase" else (change_a.abs(), change_b.abs())
    out = []
    for k in ks:
        top_a = set(score_a.topk(k).indices.tolist())
        top_b = set(score_b.topk(k).indices.tolist())
        out.append(1.0 - len(top_a & top_b) / k)
    return out


def random_rank1(d_k: int, d_v: int, generator: torch.Generator) -> Float[Tensor, "d_k d_v"]:
    """A unit-Frobenius rank-1 matrix with uniform key and value directions."""
    key = torch.nn.functional.normalize(torch.randn(d_k, generator=generator, dtype=torch.float64), dim=0)
    value = torch.nn.functional.normalize(torch.randn(d_v, generator=generator, dtype=torch.float64), dim=0)
    return torch.outer(key, value).float()


def orthogonal_rank1(
    key_factors: Float[Tensor, "rank d_k"], value_factors: Float[Tensor, "rank d_v"], generator: torch.Generator
) -> Float[Tensor, "d_k d_v"]:
    """A unit-Frobenius rank-1 matrix whose key factor is orthogonal to every key factor of an atom and
    whose value factor is orthogonal to every value factor (so it is Frobenius-orthogonal to the atom)."""

    def orthogonal(factors: Tensor, d: int) -> Tensor:
        x = torch.randn(d, generator=generator, dtype=torch.float64)
        basis, _ = torch.linalg.qr(factors.double().T)  # [d, rank], orthonormal span of the factors
        x = x - basis @ (basis.T @ x)
        return torch.nn.functional.normalize(x, dim=0)

    key = orthogonal(key_factors, key_factors.shape[1])
    return torch.outer(key, orthogonal(value_factors, value_factors.shape[1])).float()


def _centred(x: Tensor) -> Tensor:
    x = x.double()
    return x - x.mean(-1, keepdim=True)


@torch.no_grad()
def perturbation_logit_changes(
    walk: SequenceWalk,
    cell: Cell,
    row: int,
    position: int,
    perturbations: dict[str, Float[Tensor, "d_k d_v"]],
    read_offset: int = 0,
) -> dict[str, Float[Tensor, " d_vocab"]]:
    """The logit change at ``position + read_offset`` from adding each perturbation to the head's state at ``position``.

    Args:
        walk: The walk of the sequences (advanced to ``position`` here).
        cell: The perturbed head.
        row: The sequence's row in the walk.
        position: Where the state is perturbed.
        perturbations: ``{name: matrix}``, each added alone.
        read_offset: How far after ``position`` the logits are read.
    """
    name = cell.state_hook(walk.model)
    conditions = [(row, [])] + [(row, [(name, add_to_states(position, delta))]) for delta in perturbations.values()]
    logits = walk.fork_rows(position, conditions, until=position + read_offset + 1)[:, -1].float().cpu()
    return {key: logits[i + 1] - logits[0] for i, key in enumerate(perturbations)}


# ---------------------------------------------------------------------- the protocol


class Selectivity(Protocol[SelectivityRecord]):
    """The selectivity protocol (run it with `run_protocol`, or `run_selectivity`).

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE (its cell is perturbed through ``heads.{h}.hook_state``).
        tokens: Held-out sequences ``[batch, pos]`` without padding.
        config: Protocol choices.
        atoms: Atoms to test (default: the ``n_atoms`` most frequent).
    """

    name, title, record_type = "selectivity", "Direction-space selectivity of atom perturbations", SelectivityRecord

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        config: SelectivityConfig | None = None,
        atoms: list[int] | None = None,
    ) -> None:
        self.model, self.sae, self.tokens = model, sae, tokens
        self.config = config = config or SelectivityConfig()
        if max(config.ks) > model.cfg.d_vocab:
            raise ValueError(f"ks={config.ks}: K cannot exceed the vocabulary ({model.cfg.d_vocab} tokens)")
        if not has_factor_decoder(sae.cfg.variant):
            raise ValueError(
                f"selectivity perturbs with an atom's rank-r factors and builds the orthogonal control from them; "
                f"this SAE's variant {sae.cfg.variant!r} has dense atoms: use a WriteSAE with a factor decoder"
            )
        self.cell, self.kind = sae_cell(model, sae)
        activity = scan_activity(model, sae, tokens, self.cell, self.kind, batch_size=config.scan_batch_size)
        if atoms is None and config.n_atoms is not None:
            atoms = activity.frequent_atoms(config.n_atoms)
        valid = torch.ones(tokens.shape, dtype=torch.bool)
        if config.read_offset:
            valid[:, tokens.shape[1] - config.read_offset :] = False
        self.firings = select_firings(activity, atoms=atoms, max_per_atom=config.max_firings_per_atom, valid=valid,
                                      seed=config.seed)  # fmt: skip
        with torch.no_grad():
            self.key_factors = sae.atom_key.detach().float().cpu()  # [d_sae, rank, d_k]
            self.value_factors = sae.atom_value.detach().float().cpu()

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head, "sae_reads": self.kind},
            "sae": {"d_sae": self.sae.cfg.d_sae, "k": self.sae.cfg.k, "variant": self.sae.cfg.variant},
            "tokens": token_fingerprint(self.tokens),
            "n_firings": len(self.firings),
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[SelectivityRecord]]]]:
        for b in sorted({f.sequence for f in self.firings}):
            yield f"seq-{b}", lambda b=b: self._sequence(b)

    def _atom(self, atom: int) -> Tensor:
        matrix = torch.einsum("rk,rv->kv", self.key_factors[atom], self.value_factors[atom])
        return matrix / matrix.norm().clamp(min=1e-30)

    @torch.no_grad()
    def _sequence(self, b: int) -> list[SelectivityRecord]:
        config, cfg = self.config, self.model.cfg
        tokens = self.tokens[b : b + 1]
        generator = unit_generator(config.seed, f"seq-{b}")
        trace = trace_cell(self.model, tokens, self.cell, with_states=config.eps_scale == "state_norm")
        walk = SequenceWalk(self.model, tokens)
        firings = sorted((f for f in self.firings if f.sequence == b), key=lambda f: (f.position, f.atom))
        records = []
        for t, at_t in groupby(firings, key=lambda f: f.position):
            for f in at_t:
                norm = config.epsilon * self._unit(trace, t)
                perturbations = {
                    "atom": self._atom(f.atom),
                    "random": random_rank1(cfg.d_k, cfg.d_v, generator),
                    "orthogonal": orthogonal_rank1(self.key_factors[f.atom], self.value_factors[f.atom], generator),
                    "random_b": random_rank1(cfg.d_k, cfg.d_v, generator),
                }
                scaled = {k: norm * m for k, m in perturbations.items()}
                changes = perturbation_logit_changes(walk, self.cell, 0, t, scaled, config.read_offset)
                records.append(self._record(f, norm, changes))
        return records

    def _unit(self, trace: Any, t: int) -> float:
        if self.config.eps_scale == "state_norm":
            return float(trace.states[0, t].norm())
        if self.config.eps_scale == "write_norm":
            return float(trace.key[0, t].norm() * trace.value[0, t].norm())
        return 1.0

    def _record(self, f: Firing, norm: float, changes: dict[str, Tensor]) -> SelectivityRecord:
        config = self.config
        members = {"atom|random": ("atom", "random"), "atom|orthogonal": ("atom", "orthogonal"),
                   "random|random": ("random", "random_b")}  # fmt: skip
        selectivity, cosine = {}, {}
        for pair, (a, b) in members.items():
            selectivity[pair] = topk_selectivity(changes[a], changes[b], config.ks, config.rank_by)
            ca, cb = _centred(changes[a]), _centred(changes[b])
            cosine[pair] = float(ca @ cb / (ca.norm() * cb.norm()).clamp(min=1e-300))
        return SelectivityRecord(sequence=f.sequence, position=f.position, atom=f.atom, activation=f.activation,
                                 norm=norm, selectivity=selectivity, logit_cosine=cosine,
                                 change_norm={k: float(_centred(v).norm()) for k, v in changes.items()})  # fmt: skip

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[SelectivityRecord]) -> dict[str, Any]:
        ks = list(self.config.ks)
        pairs = []
        for pair in PAIRS:
            values = np.asarray([r.selectivity[pair] for r in records], float).reshape(len(records), len(ks))
            per_k = values.mean(0) if records else np.full(len(ks), np.nan)
            pairs.append({
                "pair": pair,
                "mean": float(values.mean()) if records else None,
                "min_over_k": float(per_k.min()) if records else None,
                "fraction_above_0.99": float((values.mean(1) > 0.99).mean()) if records else None,
                "median_logit_cosine": float(np.median([r.logit_cosine[pair] for r in records])) if records else None,
                **{f"K={k}": float(v) for k, v in zip(ks, per_k)},
            })  # fmt: skip
        by_pair = {p["pair"]: p for p in pairs}
        headline = {
            "n_firings": len(records),
            "n_atoms": len({r.atom for r in records}),
            "atom_vs_random": by_pair["atom|random"]["mean"],
            "atom_vs_orthogonal": by_pair["atom|orthogonal"]["mean"],
            "random_vs_random": by_pair["random|random"]["mean"],
            "atom_vs_random_min_over_k": by_pair["atom|random"]["min_over_k"],
            "random_vs_random_min_over_k": by_pair["random|random"]["min_over_k"],
        }
        if records:
            gap = headline["atom_vs_random"] - headline["random_vs_random"]
            headline["atom_minus_random_floor"] = gap
        return {"headline": headline, "ks": ks, "pairs": pairs, "paper_reference": PAPER_REFERENCE}

    def report(self, summary: dict[str, Any], records: list[SelectivityRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Results", "No firings (no atom fired on the sequences).")]
        h, ref = summary["headline"], PAPER_REFERENCE
        sections.append((
            "Headline",
            (f"Over {h['n_firings']} firings of {h['n_atoms']} atoms (L{self.cell.layer} H{self.cell.head}), mean "
             f"selectivity over K: atom vs matched-norm random rank-1 **{h['atom_vs_random']:.4f}**, atom vs "
             f"orthogonal rank-1 {h['atom_vs_orthogonal']:.4f}; two independent random rank-1 perturbations "
             f"**{h['random_vs_random']:.4f}**. The atom's score is at the floor that any rank-1 perturbation reaches, "
             "so it does not tell atoms from random directions (as the paper notes).\n\n"
             f"Paper ({ref['table']}, {ref['model']}; a different model): {ref['value']}."),
        ))  # fmt: skip
        columns = ["pair", "mean", *[f"K={k}" for k in summary["ks"]], "fraction_above_0.99", "median_logit_cosine"]
        sections.append(("Selectivity by K", markdown_table(summary["pairs"], columns)))
        return sections

    def plots(self, summary: dict[str, Any], records: list[SelectivityRecord], plt: Any) -> dict[str, Any]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for row in summary["pairs"]:
            axes[0].plot(summary["ks"], [row[f"K={k}"] for k in summary["ks"]], marker="o", label=row["pair"])
        axes[0].set_xlabel("K")
        axes[0].set_ylabel("mean selectivity")
        axes[0].legend()
        for pair in PAIRS:
            axes[1].hist([r.logit_cosine[pair] for r in records], bins=30, range=(-1, 1), alpha=0.5, label=pair)
        axes[1].set_xlabel("cosine of the two logit changes")
        axes[1].legend()
        fig.tight_layout()
        return {"selectivity.png": fig}

    def tables(self, summary: dict[str, Any], records: list[SelectivityRecord]) -> dict[str, list[Any]]:
        rows = []
        for atom, group in groupby(sorted(records, key=lambda r: r.atom), key=lambda r: r.atom):
            group = list(group)
            means = {pair: float(np.mean([np.mean(r.selectivity[pair]) for r in group])) for pair in PAIRS}
            rows.append({"atom": atom, "n_firings": len(group), **means})
        return {"atoms": rows}


def run_selectivity(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: SelectivityConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[SelectivityRecord]:
    """Selectivity of an SAE's atoms against matched-norm rank-1 controls, and of the controls against each other.

    Args:
        model: The hooked model.
        sae: A per-head WriteSAE.
        tokens: Held-out sequences without padding.
        config: Protocol choices (`SelectivityConfig`).
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the sequences.
        **options: `Selectivity`'s keyword arguments (``atoms``).

    Returns:
        One `SelectivityRecord` per firing and the summary (``summary["headline"]``).
    """
    return run_protocol(Selectivity(model, sae, tokens, config=config, **options), out_dir, mode=mode, verbose=verbose)
