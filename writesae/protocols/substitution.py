"""The substitution test (paper §3): does an atom stand in for the write it fires on?

At every firing (a position ``t`` where an atom's code is nonzero) the model continues from the same
prefix under several conditions, batched in one fork:

- base: unedited;
- delete: the cell's write at ``t`` removed;
- atom: the write replaced by an atom, for each *variant* below;
- random: the write replaced by the random control, at each variant's norm.

A variant is a choice of atom (``substitute``: the atom whose firing defines the position, or the
largest code there) and of scale (``scale``: the atom times its SAE activation, or the atom at the
Frobenius norm of the native write). All four variants are measured on every firing; the config
names the headline one, and the summary puts the others beside it, so that no single favourable
cell becomes the headline. The KL divergence of each edited next-token distribution from the base
one scores a condition; the atom *wins* when it disturbs the model less than deleting the write.

The statistics follow the paper: win rate with a Wilson interval, bootstrap intervals clustered by
atom and by passage (sequence), a passage-level sign-flip permutation test, the strict chain atom <
delete < random, a paired Wilcoxon test, Cliff's delta, medians with MAD/sqrt(n), the per-atom
population test, and the register / bundle partition of every alive atom on the scanned sequences.
Firings are counted as records and as distinct positions; variants that substitute the dominant
atom count each position once (several firings at one position share its dominant atom).

Each sequence is walked once (`writesae.protocols.walk`): one cache advances from firing to firing
and only the conditions fork. Every ambiguous choice is a `SubstitutionConfig` field whose default
is the paper's main text (docs/design.md §5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.edits import add_to_states, set_writes

from .activity import Activity, Firing, partition_alive, scan_activity, select_firings
from .cell import Cell, CellTrace, sae_cell, trace_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, unit_generator
from .stats import (
    cliffs_delta,
    cluster_bootstrap,
    mann_whitney,
    median_mad,
    paired_wilcoxon,
    sign_flip_test,
    wilson_interval,
)
from .walk import SequenceWalk

__all__ = [
    "SubstitutionConfig",
    "SubstitutionRecord",
    "SubstitutionAtom",
    "SubstitutionTest",
    "run_substitution",
    "kl_divergence",
    "VARIANTS",
]

VARIANTS: tuple[str, ...] = ("firing/activation", "firing/matched_norm", "dominant/activation", "dominant/matched_norm")
"""Every (substituted atom, scale) pair, named ``"{substitute}/{scale}"``."""


@dataclass
class SubstitutionConfig:
    """Choices of the substitution test (defaults: the paper's main text; docs/design.md §5).

    Attributes:
        scale: Headline scale. ``"activation"``: the atom times its SAE code (main text);
            ``"matched_norm"``: the atom at the native write's Frobenius norm (App. J, code).
        substitute: Headline atom. ``"firing"``: the atom whose firing defines the position (main
            text); ``"dominant"``: the largest code at that position (App. J pseudo-code).
        variants: The variants measured on every firing (the headline is always measured): all of
            `VARIANTS` by default, so the alternatives sit beside the headline; fewer conditions run
            faster.
        random_control: ``"nonfiring_atom"``: an atom that does not fire at the position, at the
            atom condition's norm (the paper's control); ``"uniform_rank1"``: uniform key and value
            directions; ``"per_coordinate"``: each key and value coordinate drawn from the
            sequence's native write factors, renormalised (the paper's Mamba-2 control).
        kl_direction: ``"edited||base"`` (paper: KL(p_patched || p_base)) or ``"base||edited"`` (code).
        kl_offsets: Positions after the firing whose next-token distributions are compared (0: the
            firing position itself); the KL is averaged over them.
        write: ``"native"`` (``beta k v^T``) or ``"delta"`` (the delta-rule write ``k delta^T``).
        n_atoms: Test the ``n_atoms`` atoms that fire most often on the sequences (None: every atom
            that fires; an explicit ``atoms`` list wins).
        max_firings_per_atom: Firings tested per atom (a seeded sample; the paper caps at 30).
        min_firings: Firings an atom needs to enter the per-atom population test.
        register_threshold: ``None``: the two-component mixture assigns registers and bundles (Fig.
            2a); a number: register iff the median cosine to the write is at least that (tau = 0.05).
        seed: Seed of the firing sample and of the random controls.
        n_bootstrap: Bootstrap resamples.
        n_permutations: Sign-flip permutations.
        sequences_per_unit: Sequences walked together, one cache for all: every condition of every
            sequence that fires at a position runs in one batched pass (fewer passes over the weights).
            One unit of the record log; the records do not depend on it.
        scan_batch_size: Sequences encoded at once when scanning the codes.
    """

    scale: Literal["activation", "matched_norm"] = "activation"
    substitute: Literal["firing", "dominant"] = "firing"
    variants: tuple[str, ...] = VARIANTS
    random_control: Literal["nonfiring_atom", "uniform_rank1", "per_coordinate"] = "nonfiring_atom"
    kl_direction: Literal["edited||base", "base||edited"] = "edited||base"
    kl_offsets: tuple[int, ...] = (0,)
    write: Literal["native", "delta"] = "native"
    n_atoms: int | None = None
    max_firings_per_atom: int = 30
    min_firings: int = 5
    register_threshold: float | None = None
    seed: int = 2026
    n_bootstrap: int = 2000
    n_permutations: int = 10_000
    sequences_per_unit: int = 8
    scan_batch_size: int = 8

    def __post_init__(self) -> None:
        check_config(self, positive=("n_atoms", "max_firings_per_atom", "min_firings", "n_bootstrap", "n_permutations",
                                     "sequences_per_unit", "scan_batch_size"),
                     nonnegative=("kl_offsets", "register_threshold"), nonempty=("kl_offsets",))  # fmt: skip
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants {unknown} are not among {list(VARIANTS)}")

    @property
    def headline(self) -> str:
        """The headline variant, ``"{substitute}/{scale}"``."""
        return f"{self.substitute}/{self.scale}"

    @property
    def measured(self) -> list[str]:
        """The variants measured: the headline, then the other ``variants``, in `VARIANTS` order."""
        return [v for v in VARIANTS if v == self.headline or v in self.variants]


@dataclass
class SubstitutionRecord:
    """One tested firing.

    Attributes:
        sequence: Sequence index.
        position: Firing position.
        atom: The firing atom.
        activation: Its code at the position.
        dominant_atom: The largest code at the position.
        dominant_activation: That code.
        random_atom: The atom used as random control (-1 when the control is not an atom).
        write_norm: Frobenius norm of the replaced write.
        cos_atom_to_write: Frobenius cosine of the firing atom to the write.
        cos_dominant_to_write: The same for the dominant atom.
        kl_delete: KL of the deletion.
        kl_atom: KL of the atom condition, per measured variant.
        kl_random: KL of the random control, per measured variant (at that variant's norm).
        top1: Top-1 token at the firing under ``base``, ``delete``, and the headline ``atom`` and ``random``.
    """

    sequence: int
    position: int
    atom: int
    activation: float
    dominant_atom: int
    dominant_activation: float
    random_atom: int
    write_norm: float
    cos_atom_to_write: float
    cos_dominant_to_write: float
    kl_delete: float
    kl_atom: dict[str, float]
    kl_random: dict[str, float]
    top1: dict[str, int]


@dataclass
class SubstitutionAtom:
    """One alive atom (row of ``atoms.jsonl``).

    Attributes:
        atom: Atom index.
        n_positions: Positions where it fires on the scanned sequences.
        median_cosine: Median Frobenius cosine to the native writes at those positions.
        atom_class: ``"register"`` or ``"bundle"`` (docs/design.md §5).
        n_tested: Its firings that were substituted (as the firing atom).
        n_wins: Of those, wins in the headline variant.
        win_rate: ``n_wins / n_tested`` (None when untested).
        strict_chain_rate: Of those, the fraction with atom < delete < random (headline variant).
        win_rates: Win rate in every variant (tested atoms).
    """

    atom: int
    n_positions: int
    median_cosine: float
    atom_class: str
    n_tested: int
    n_wins: int
    win_rate: float | None
    strict_chain_rate: float | None
    win_rates: dict[str, float]


def kl_divergence(
    logits_p: Float[Tensor, "... d_vocab"], logits_q: Float[Tensor, "... d_vocab"]
) -> Float[Tensor, "..."]:
    """KL(p || q) of the softmax distributions, in nats (float64)."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass
class _Plan:
    """The conditions of one firing: variant -> key of its atom and of its random condition."""

    firing: Firing
    dominant: tuple[int, float]
    random_atom: int
    atoms: dict[str, tuple]
    randoms: dict[str, tuple]
    matrices: dict[tuple, Tensor]


class SubstitutionTest(Protocol[SubstitutionRecord]):
    """The substitution test as a protocol (run it with `run_protocol`, or `run_substitution`).

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE (on ``hook_state`` or ``hook_write``).
        tokens: Held-out sequences (the paper's validation split).
        attention_mask: Their padding mask.
        config: Protocol choices.
        atoms: Atoms to test (default: every atom that fires).
        firings: Test exactly these firings instead of sampling them.
        recompute_prefixes: Recompute the prefix for every firing, and fork its conditions alone,
            instead of walking the sequences once (same records; the per-firing way, for checks and
            benchmarks).
    """

    name, title, record_type = "substitution", "Substitution test", SubstitutionRecord

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        config: SubstitutionConfig | None = None,
        atoms: list[int] | None = None,
        firings: list[Firing] | None = None,
        recompute_prefixes: bool = False,
    ) -> None:
        self.model, self.sae, self.tokens, self.attention_mask = model, sae, tokens, attention_mask
        self.config = config = config or SubstitutionConfig()
        self.recompute_prefixes = recompute_prefixes
        self.cell, self.kind = sae_cell(model, sae)
        self.activity: Activity = scan_activity(model, sae, tokens, self.cell, self.kind, attention_mask=attention_mask,
                                                batch_size=config.scan_batch_size)  # fmt: skip
        self.partition = partition_alive(self.activity, config.register_threshold, config.seed)
        if firings is None:
            if atoms is None and config.n_atoms is not None:
                atoms = self.activity.frequent_atoms(config.n_atoms)
            valid = torch.ones(tokens.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
            if max(config.kl_offsets):
                valid[:, tokens.shape[1] - max(config.kl_offsets) :] = False
            firings = select_firings(self.activity, atoms=atoms, max_per_atom=config.max_firings_per_atom, valid=valid,
                                     seed=config.seed)  # fmt: skip
        self.firings = sorted(firings, key=lambda f: (f.sequence, f.position, f.atom))
        with torch.no_grad():
            self.atom_norms = sae.get_W_dec_norm().float().cpu()

    def settings(self) -> dict[str, Any]:
        meta = self.sae.cfg.metadata
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head, "sae_reads": self.kind, "hook": meta.hook_name},
            "sae": {"d_sae": self.sae.cfg.d_sae, "k": self.sae.cfg.k, "variant": self.sae.cfg.variant},
            "tokens": {"shape": list(self.tokens.shape), "sha1": hashlib.sha1(self.tokens.cpu().numpy().tobytes()).hexdigest()},
            "n_firings": len(self.firings),
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[SubstitutionRecord]]]]:
        sequences = sorted({f.sequence for f in self.firings})
        size = self.config.sequences_per_unit
        for first in range(0, len(sequences), size):
            group = sequences[first : first + size]
            yield f"seq-{group[0]}-{group[-1]}", lambda group=group: self._sequences(group)

    # ------------------------------------------------------------------ a group of sequences

    @torch.no_grad()
    def _sequences(self, group: list[int]) -> list[SubstitutionRecord]:
        """Walk the group's sequences together; at each firing position fork every condition of every
        sequence that fires there in one batched pass."""
        config = self.config
        generators = {b: unit_generator(config.seed, f"seq-{b}") for b in group}  # per sequence: grouping-free
        tokens = self.tokens[group]
        mask = None if self.attention_mask is None else self.attention_mask[group]
        trace = trace_cell(self.model, tokens, self.cell, attention_mask=mask, with_states=config.write == "delta")
        walk = SequenceWalk(self.model, tokens, mask, recompute=self.recompute_prefixes)
        row_of = {b: i for i, b in enumerate(group)}
        firings = sorted((f for f in self.firings if f.sequence in row_of), key=lambda f: (f.position, f.sequence, f.atom))
        # Walking, every firing at a position shares one fork; recomputing, each firing has its own
        # prefix and fork, as a per-firing implementation would.
        fork_group = (lambda f: f.position) if not self.recompute_prefixes else (lambda f: (f.position, f.sequence, f.atom))
        records = []
        for _, at_t in groupby(firings, key=fork_group):
            at_t = list(at_t)
            t = at_t[0].position
            conditions: list[tuple[int, list]] = []  # (row of the walk, hooks)
            work = []
            for b, of_b in groupby(at_t, key=lambda f: f.sequence):
                row = row_of[b]
                native = self._native_write(trace, row, t)
                plans = [self._plan(f, native, trace, row, mask, generators[b]) for f in of_b]
                rows = {"base": len(conditions), "delete": len(conditions) + 1}  # condition key -> its fork row
                conditions += [(row, []), (row, self._edit(t, torch.zeros_like(native), native))]
                for plan in plans:
                    for key, matrix in plan.matrices.items():
                        if key not in rows:
                            rows[key] = len(conditions)
                            conditions.append((row, self._edit(t, matrix, native)))
                work.append((native, plans, rows))
            logits = walk.fork_rows(t, conditions, until=t + 1 + max(config.kl_offsets))  # [cond, L, V]
            for native, plans, rows in work:
                keys, index = list(rows), torch.tensor(list(rows.values()))
                kl = dict(zip(keys, self._kl(logits[rows["base"]], logits[index]).tolist(), strict=True))
                top1 = dict(zip(keys, logits[index, 0].argmax(-1).tolist(), strict=True))
                records += [self._record(plan, native, kl, top1) for plan in plans]
        return sorted(records, key=lambda r: (r.sequence, r.position, r.atom))

    def _native_write(self, trace: CellTrace, row: int, t: int) -> Float[Tensor, "d_k d_v"]:
        if self.config.write == "native":
            return trace.write(row, t).float()
        before = trace.states[row, t - 1] if t > 0 else torch.zeros_like(trace.states[row, t])
        return (trace.states[row, t] - trace.log_decay[row, t].exp() * before).float()

    def _edit(self, t: int, matrix: Tensor, native: Tensor) -> list:
        """Hooks replacing the write at ``t`` by ``matrix`` (for ``write="delta"``: through the state)."""
        if self.config.write == "native":
            return [(self.cell.write_hook(self.model), set_writes({t: matrix}))]
        return [(self.cell.state_hook(self.model), add_to_states(t, matrix - native))]

    def _plan(
        self, firing: Firing, native: Tensor, trace: CellTrace, row: int, mask: Tensor | None, generator: torch.Generator
    ) -> _Plan:
        active, codes = self.activity.codes_at(firing.sequence, firing.position)
        if len(active):
            top = int(codes.argmax())
            dominant = (int(active[top]), float(codes[top]))
        else:  # a firing given by the caller where the scan saw no code
            dominant = (firing.atom, firing.activation)
        random_atom, direction = self._random_direction(firing, active, trace, row, mask, generator)
        plan = _Plan(firing, dominant, random_atom, {}, {}, {})
        native_norm = float(native.norm())
        for variant in self.config.measured:
            substitute, scale = variant.split("/")
            atom, coefficient = (firing.atom, firing.activation) if substitute == "firing" else dominant
            matrix, norm = self._substitute(firing, atom)
            factor = coefficient if scale == "activation" else native_norm / norm
            # Equal conditions share one key, so one row: the dominant atom is often the firing one, and
            # at the matched norm the random control does not depend on the atom.
            atom_key = ("atom", atom, factor)
            if atom_key not in plan.matrices:
                plan.matrices[atom_key] = factor * matrix
            norm = float(plan.matrices[atom_key].norm())
            random_key = ("random", firing.atom, norm)
            plan.matrices.setdefault(random_key, direction * norm)
            plan.atoms[variant], plan.randoms[variant] = atom_key, random_key
        return plan

    def _substitute(self, firing: Firing, atom: int) -> tuple[Float[Tensor, "d_k d_v"], float]:
        """The matrix put in place of the write when ``atom`` is substituted at ``firing``'s position,
        before scaling, and the norm the matched-norm scale divides by: the atom and its Frobenius norm.
        (`writesae.protocols.flat_svd` puts a flat SAE's top singular pair here instead.)"""
        return self.sae.atom_matrices(torch.tensor([atom]))[0].detach().float().cpu(), float(self.atom_norms[atom])

    def _random_direction(
        self, firing: Firing, active: Tensor, trace: CellTrace, row: int, mask: Tensor | None, generator: torch.Generator
    ) -> tuple[int, Float[Tensor, "d_k d_v"]]:
        """The random control's unit-norm direction (and its atom, for ``"nonfiring_atom"``)."""
        control = self.config.random_control
        d_k, d_v = trace.key.shape[-1], trace.value.shape[-1]
        if control == "nonfiring_atom":
            excluded = set(active.tolist()) | {firing.atom}
            candidates = torch.tensor([a for a in range(self.sae.cfg.d_sae) if a not in excluded])
            atom = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
            matrix = self.sae.atom_matrices(torch.tensor([atom]))[0].detach().float().cpu()
            return atom, matrix / matrix.norm()
        if control == "uniform_rank1":
            key = torch.randn(d_k, generator=generator, dtype=torch.float64)
            value = torch.randn(d_v, generator=generator, dtype=torch.float64)
        elif control == "per_coordinate":
            valid = torch.ones(trace.key.shape[1], dtype=torch.bool) if mask is None else mask[row].bool().cpu()
            keys, values = trace.key[row, valid].double(), trace.value[row, valid].double()
            key = keys[torch.randint(len(keys), (d_k,), generator=generator), torch.arange(d_k)]
            value = values[torch.randint(len(values), (d_v,), generator=generator), torch.arange(d_v)]
        else:
            raise ValueError(
                f"random_control={control!r} is not one of 'nonfiring_atom', 'uniform_rank1', 'per_coordinate'"
            )
        matrix = torch.outer(key, value)
        return -1, (matrix / matrix.norm().clamp(min=1e-30)).float()

    def _kl(
        self, base: Float[Tensor, "L d_vocab"], edited: Float[Tensor, "condition L d_vocab"]
    ) -> Float[Tensor, " condition"]:
        """Each condition's score: KL at the configured offsets, averaged (float64)."""
        offsets = list(self.config.kl_offsets)
        base, edited = base[offsets], edited[:, offsets]
        if self.config.kl_direction == "edited||base":
            return kl_divergence(edited, base).mean(-1)
        return kl_divergence(base, edited).mean(-1)

    def _record(self, plan: _Plan, native: Tensor, kl: dict, top1: dict) -> SubstitutionRecord:
        """One firing's record, from the KL and top-1 token of every condition key."""
        firing, headline = plan.firing, self.config.headline

        def cosine(atom: int) -> float:
            matrix = self.sae.atom_matrices(torch.tensor([atom]))[0].detach().float().cpu()
            return float(torch.nn.functional.cosine_similarity(matrix.flatten(), native.flatten(), dim=0))

        return SubstitutionRecord(
            sequence=firing.sequence,
            position=firing.position,
            atom=firing.atom,
            activation=firing.activation,
            dominant_atom=plan.dominant[0],
            dominant_activation=plan.dominant[1],
            random_atom=plan.random_atom,
            write_norm=float(native.norm()),
            cos_atom_to_write=cosine(firing.atom),
            cos_dominant_to_write=cosine(plan.dominant[0]),
            kl_delete=kl["delete"],
            kl_atom={v: kl[key] for v, key in plan.atoms.items()},
            kl_random={v: kl[key] for v, key in plan.randoms.items()},
            top1={"base": top1["base"], "delete": top1["delete"], "atom": top1[plan.atoms[headline]],
                  "random": top1[plan.randoms[headline]]},  # fmt: skip
        )

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[SubstitutionRecord]) -> dict[str, Any]:
        config = self.config
        summary: dict[str, Any] = {
            "headline_variant": config.headline,
            "n_firings": len(records),
            "n_positions": len({(r.sequence, r.position) for r in records}),
            "n_sequences": len({r.sequence for r in records}),
            "n_atoms": len({r.atom for r in records}),
        }
        if records:
            summary["headline"] = _variant_stats(_for_variant(records, config.headline), config.headline, config, full=True)
            summary["alternatives"] = [_variant_stats(_for_variant(records, v), v, config) for v in config.measured]
        summary["population"] = _population(records, config, self.partition)
        summary["partition"] = self._partition_summary()
        return summary

    def _partition_summary(self) -> dict[str, Any]:
        p, activity = self.partition, self.activity
        cosines = activity.median_cosines()
        alive = len(cosines)
        out: dict[str, Any] = {
            "scanned_positions": activity.n_positions,
            "n_alive": alive,
            "n_dead": self.sae.cfg.d_sae - alive,
            "rule": "mixture" if p.threshold is None else f"median cosine >= {p.threshold}",
            "n_registers": len(p.registers),
            "n_bundles": len(p.bundles),
            "delta_bic": p.delta_bic,
            "n_above_0.05": sum(c >= 0.05 for c in cosines.values()),
        }
        if p.mixture is not None:
            out["mixture_means"] = p.mixture.means.tolist()
            out["mixture_weights"] = p.mixture.weights.tolist()
        for name, atoms in (("register", p.registers), ("bundle", p.bundles)):
            values = [cosines[a] for a in atoms]
            out[f"{name}_median_cosine"] = float(np.median(values)) if values else None
        return out

    def tables(self, summary: dict[str, Any], records: list[SubstitutionRecord]) -> dict[str, list[Any]]:
        counts = self.activity.firing_counts()
        registers = set(self.partition.registers)
        by_atom: dict[int, list[SubstitutionRecord]] = {}
        for r in records:
            by_atom.setdefault(r.atom, []).append(r)
        rows = []
        for atom, cosine in sorted(self.activity.median_cosines().items()):
            tested = by_atom.get(atom, [])
            rates = {v: float(np.mean([r.kl_atom[v] < r.kl_delete for r in tested])) for v in self.config.measured} if tested else {}
            headline = self.config.headline
            wins = sum(r.kl_atom[headline] < r.kl_delete for r in tested)
            chains = sum(r.kl_atom[headline] < r.kl_delete < r.kl_random[headline] for r in tested)
            rows.append(SubstitutionAtom(
                atom=atom,
                n_positions=int(counts[atom]),
                median_cosine=cosine,
                atom_class="register" if atom in registers else "bundle",
                n_tested=len(tested),
                n_wins=int(wins),
                win_rate=wins / len(tested) if tested else None,
                strict_chain_rate=chains / len(tested) if tested else None,
                win_rates=rates,
            ))  # fmt: skip
        return {"atoms": rows}

    # ------------------------------------------------------------------ report

    def report(self, summary: dict[str, Any], records: list[SubstitutionRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Headline", "No firings.")]
        h = summary["headline"]
        sections.append((
            "Headline",
            f"In the headline setting (`{summary['headline_variant']}`, random control `{self.config.random_control}`), "
            f"the atom beats deletion on **{h['win_rate']:.1%}** of {h['n']} firings at {summary['n_positions']} "
            f"positions in {summary['n_sequences']} sequences (Wilson 95% [{h['wilson95'][0]:.1%}, {h['wilson95'][1]:.1%}]; "
            f"clustered by atom [{h['atom_bootstrap95'][0]:.1%}, {h['atom_bootstrap95'][1]:.1%}], by passage "
            f"[{h['passage_bootstrap95'][0]:.1%}, {h['passage_bootstrap95'][1]:.1%}]; passage-level sign-flip p = "
            f"{h['permutation_p']:.3g}). Strict chain atom < delete < random: {h['strict_chain_rate']:.1%}; paired "
            f"Wilcoxon p = {h['wilcoxon_p']:.3g}; Cliff's delta (delete vs atom) {h['cliffs_delta']:+.3f}.",
        ))  # fmt: skip
        columns = ["variant", "n", "win_rate", "wilson_low", "wilson_high", "strict_chain_rate", "median_kl_atom", "median_kl_random"]
        rows = [{**a, "wilson_low": a["wilson95"][0], "wilson_high": a["wilson95"][1]} for a in summary["alternatives"]]
        sections.append(("Every variant (the headline is one row)", markdown_table(rows, columns)))
        medians = [{"condition": c, "median KL": v["median"], "MAD/sqrt(n)": v["mad_over_sqrt_n"]} for c, v in h["median_kl"].items()]
        sections.append(("Median KL (headline variant)", markdown_table(medians, ["condition", "median KL", "MAD/sqrt(n)"])))
        pop, part = summary["population"], summary["partition"]
        if pop.get("n_atoms"):
            sections.append((
                "Per-atom population test",
                f"{pop['n_atoms']} atoms with >= {self.config.min_firings} firings: mean per-atom win rate "
                f"{pop['mean_atom_win_rate']:.1%} (bootstrap 95% [{pop['mean_atom_win_rate_bootstrap95'][0]:.1%}, "
                f"{pop['mean_atom_win_rate_bootstrap95'][1]:.1%}]); registers {_pct(pop['register_mean_win_rate'])}, "
                f"bundles {_pct(pop['bundle_mean_win_rate'])} (Mann-Whitney p = {_num(pop['register_vs_bundle_mannwhitney_p'])}).",
            ))  # fmt: skip
        sections.append((
            "Register / bundle partition of every alive atom",
            f"{part['n_alive']} atoms fire on the {part['scanned_positions']} scanned positions ({part['n_dead']} never do). "
            f"Rule: {part['rule']}: {part['n_registers']} registers (median cosine {_num(part['register_median_cosine'])}), "
            f"{part['n_bundles']} bundles (median cosine {_num(part['bundle_median_cosine'])}); delta BIC (2 vs 1 "
            f"components) {_num(part['delta_bic'])}; {part['n_above_0.05']} atoms have median cosine >= 0.05. "
            "Per-atom rows are in `atoms.jsonl`.",
        ))  # fmt: skip
        return sections

    def plots(self, summary: dict[str, Any], records: list[SubstitutionRecord], plt: Any) -> dict[str, Any]:
        headline = self.config.headline
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.logspace(-8, 2, 41)
        values = {"atom": [r.kl_atom[headline] for r in records], "delete": [r.kl_delete for r in records],
                  "random": [r.kl_random[headline] for r in records]}  # fmt: skip
        for (condition, kls), color in zip(values.items(), ("tab:green", "tab:orange", "tab:red")):
            ax.hist(np.clip(kls, 1e-8, None), bins=bins, alpha=0.5, label=condition, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("KL to the unedited next-token distribution (nats)")
        ax.set_ylabel("firings")
        ax.legend()
        ax.set_title(f"{headline}: atom wins {summary['headline']['win_rate']:.1%} of {len(records)} firings")
        figures = {"kl_histogram.png": fig}
        tested = [row for row in self.tables(summary, records)["atoms"] if row.n_tested >= self.config.min_firings]
        if tested:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for cls, color in (("register", "tab:blue"), ("bundle", "tab:gray")):
                rows = [row for row in tested if row.atom_class == cls]
                ax.scatter([row.median_cosine for row in rows], [row.win_rate for row in rows], s=12, color=color, label=cls)
            ax.set_xlabel("median cosine of atom to native write")
            ax.set_ylabel(f"per-atom win rate ({headline})")
            ax.legend()
            figures["win_rate_by_atom.png"] = fig
        return figures


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3g}"


def _for_variant(records: list[SubstitutionRecord], variant: str) -> list[SubstitutionRecord]:
    """The records a variant's statistics count: the dominant atom is tested once per position."""
    if not variant.startswith("dominant"):
        return records
    seen, kept = set(), []
    for r in records:
        if (r.sequence, r.position) not in seen:
            seen.add((r.sequence, r.position))
            kept.append(r)
    return kept


def _variant_stats(
    records: list[SubstitutionRecord], variant: str, config: SubstitutionConfig, full: bool = False
) -> dict[str, Any]:
    kl_atom = np.array([r.kl_atom[variant] for r in records])
    kl_delete = np.array([r.kl_delete for r in records])
    kl_random = np.array([r.kl_random[variant] for r in records])
    wins = kl_atom < kl_delete
    n = len(records)
    out: dict[str, Any] = {
        "variant": variant,
        "n": n,
        "win_rate": float(wins.mean()),
        "wilson95": wilson_interval(int(wins.sum()), n),
        "strict_chain_rate": float(((kl_atom < kl_delete) & (kl_delete < kl_random)).mean()),
        "median_kl_atom": float(np.median(kl_atom)),
        "median_kl_delete": float(np.median(kl_delete)),
        "median_kl_random": float(np.median(kl_random)),
    }
    if full:
        medians = {"atom": median_mad(kl_atom), "delete": median_mad(kl_delete), "random": median_mad(kl_random)}
        passages = [r.sequence for r in records]
        out.update({
            "atom_bootstrap95": cluster_bootstrap(wins.astype(float), [r.atom for r in records], n_resamples=config.n_bootstrap, seed=config.seed),
            "passage_bootstrap95": cluster_bootstrap(wins.astype(float), passages, n_resamples=config.n_bootstrap, seed=config.seed),
            "permutation_p": sign_flip_test(kl_atom, kl_delete, passages, n_permutations=config.n_permutations, seed=config.seed),
            "wilcoxon_p": paired_wilcoxon(kl_atom, kl_delete),
            "cliffs_delta": cliffs_delta(kl_delete, kl_atom),
            "median_kl": {c: {"median": m, "mad_over_sqrt_n": e} for c, (m, e) in medians.items()},
            "kl_ratio_atom_delete_random": [1.0] + [
                medians[c][0] / medians["atom"][0] if medians["atom"][0] > 0 else float("inf") for c in ("delete", "random")
            ],
        })  # fmt: skip
    return out


def _population(records: list[SubstitutionRecord], config: SubstitutionConfig, partition: Any) -> dict[str, Any]:
    """The per-atom population test in the headline variant (atoms with >= min_firings firings)."""
    by_atom: dict[int, list[SubstitutionRecord]] = {}
    for r in records:
        by_atom.setdefault(r.atom, []).append(r)
    eligible = {a: rs for a, rs in by_atom.items() if len(rs) >= config.min_firings}
    if not eligible:
        return {"n_atoms": 0, "note": f"no atom has {config.min_firings} tested firings"}
    rates = {a: float(np.mean([r.kl_atom[config.headline] < r.kl_delete for r in rs])) for a, rs in eligible.items()}
    values = np.array(list(rates.values()))
    registers = set(partition.registers)
    reg = [rate for a, rate in rates.items() if a in registers]
    bun = [rate for a, rate in rates.items() if a not in registers]
    return {
        "n_atoms": len(eligible),
        "n_firings": int(sum(len(rs) for rs in eligible.values())),
        "mean_atom_win_rate": float(values.mean()),
        "mean_atom_win_rate_bootstrap95": cluster_bootstrap(values, list(rates), n_resamples=config.n_bootstrap, seed=config.seed),
        "n_registers": len(reg),
        "n_bundles": len(bun),
        "register_mean_win_rate": float(np.mean(reg)) if reg else None,
        "bundle_mean_win_rate": float(np.mean(bun)) if bun else None,
        "register_vs_bundle_mannwhitney_p": mann_whitney(reg, bun) if reg and bun else None,
    }


def run_substitution(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[SubstitutionRecord]:
    """Run the substitution test of an SAE's atoms on held-out sequences.

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE (on ``hook_state`` or ``hook_write``).
        tokens: Held-out sequences.
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the sequences.
        **options: `SubstitutionTest`'s keyword arguments (``attention_mask``, ``config``, ``atoms``,
            ``firings``, ``recompute_prefixes``).

    Returns:
        The records (`SubstitutionRecord`), the summary and the per-atom table (`SubstitutionAtom`).
    """
    return run_protocol(SubstitutionTest(model, sae, tokens, **options), out_dir, mode=mode, verbose=verbose)
