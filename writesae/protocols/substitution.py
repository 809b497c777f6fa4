"""The substitution test (paper §3): does an atom stand in for the write it fires on?

For every firing (a sequence position where an atom's code is nonzero) the model is continued from
the same prefix under four conditions, in one batched fork:

- base: unedited;
- atom: the cell's write at the firing position replaced by the substituted atom, scaled;
- delete: the write removed;
- random: the write replaced by a random rank-1 matrix of the atom's Frobenius norm.

The KL divergence of each edited next-token distribution from the base one scores the condition;
the atom *wins* when it disturbs the model less than deleting the write. Summary statistics follow
the paper: win rate with a Wilson interval, the strict chain atom < delete < random, a paired
Wilcoxon test, Cliff's delta, medians with MAD/sqrt(n), a bootstrap interval clustered by atom, and
a per-atom population test with the register/bundle partition.

The paper is ambiguous in several places; each choice is a `SubstitutionConfig` field whose
default is the main text's (DESIGN §5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.fork import fork

from .cell import Cell, encode_trace, sae_cell, trace_cell
from .edits import WriteDefinition, random_rank1, replace_write
from .report import RunDir, markdown_table, plt_module
from .stats import (
    cliffs_delta,
    cluster_bootstrap,
    mann_whitney,
    median_mad,
    paired_wilcoxon,
    partition_atoms,
    wilson_interval,
)

__all__ = ["SubstitutionConfig", "Firing", "SubstitutionResult", "find_firings", "run_substitution", "kl_divergence"]


@dataclass
class SubstitutionConfig:
    """Choices of the substitution test (defaults: the paper's main text).

    Attributes:
        scale: ``"activation"`` scales the atom by its SAE coefficient (main text);
            ``"matched_norm"`` gives it the Frobenius norm of the native write (App. J, code).
        substitute: ``"dominant"``: the largest atom of the code at the firing (App. J);
            ``"firing"``: the atom whose firing defined the position.
        kl_direction: ``"edited||base"`` (paper: KL(p_patched || p_baseline)) or
            ``"base||edited"`` (the released code's forward KL).
        kl_offsets: Positions after the firing at which the next-token distributions are compared
            (0: the firing position itself); the KL is averaged over them.
        write: Which write is replaced: ``"native"`` (``beta k v^T``) or ``"delta"`` (``k delta^T``).
        max_firings_per_atom: Firings kept per atom (the earliest by a seeded shuffle).
        min_firings: Atoms need this many firings to enter the per-atom population test.
        register_threshold: Median cosine separating registers from bundles (None: the mixture decides).
        seed: Seed of the firing sample and the random controls.
        n_bootstrap: Bootstrap resamples.
    """

    scale: Literal["activation", "matched_norm"] = "activation"
    substitute: Literal["dominant", "firing"] = "dominant"
    kl_direction: Literal["edited||base", "base||edited"] = "edited||base"
    kl_offsets: tuple[int, ...] = (0,)
    write: WriteDefinition = "native"
    max_firings_per_atom: int = 30
    min_firings: int = 5
    register_threshold: float | None = 0.05
    seed: int = 2026
    n_bootstrap: int = 2000


@dataclass(frozen=True)
class Firing:
    """A position where an atom fires."""

    sequence: int
    position: int
    atom: int
    activation: float


@dataclass
class SubstitutionResult:
    """What `run_substitution` measured: one record per firing and the summary."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: SubstitutionConfig = field(default_factory=SubstitutionConfig)


def kl_divergence(
    logits_p: Float[Tensor, "... d_vocab"], logits_q: Float[Tensor, "... d_vocab"]
) -> Float[Tensor, "..."]:
    """KL(p || q) of the softmax distributions, in nats (float64)."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def find_firings(
    codes: Float[Tensor, "batch pos d_sae"],
    *,
    atoms: list[int] | None = None,
    max_per_atom: int = 30,
    valid: Tensor | None = None,
    seed: int = 0,
) -> list[Firing]:
    """Positions where atoms fire, at most ``max_per_atom`` per atom (a seeded sample).

    Args:
        codes: SAE codes at every position.
        atoms: Atoms of interest (default: every atom that fires).
        max_per_atom: Cap per atom.
        valid: ``[batch, pos]`` bool, positions that may be used (e.g. not padding, not the last).
        seed: Seed of the sample.
    """
    active = codes > 0
    if valid is not None:
        active &= valid.to(active.device)[..., None]
    chosen = range(codes.shape[-1]) if atoms is None else atoms
    generator = torch.Generator().manual_seed(seed)
    firings = []
    for atom in chosen:
        where = active[..., atom].nonzero()
        if len(where) == 0:
            continue
        where = where[torch.randperm(len(where), generator=generator)[:max_per_atom]]
        for b, t in sorted(where.tolist()):
            firings.append(Firing(b, t, atom, float(codes[b, t, atom])))
    return firings


def run_substitution(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    config: SubstitutionConfig | None = None,
    atoms: list[int] | None = None,
    firings: list[Firing] | None = None,
    out_dir: str | Path | None = None,
    verbose: bool = True,
) -> SubstitutionResult:
    """Run the substitution test of an SAE's atoms on held-out sequences.

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE (on ``hook_state`` or ``hook_write``).
        tokens: Held-out sequences.
        attention_mask: Their padding mask.
        config: Protocol choices.
        atoms: Atoms to test (default: all that fire).
        firings: Test exactly these firings instead of searching (their ``activation`` is used
            for ``scale="activation"``).
        out_dir: Write records, summary, report and plots there.
        verbose: Progress bar.

    Returns:
        Per-firing records and the summary (also written to ``out_dir``).
    """
    config = config or SubstitutionConfig()
    cell, kind = sae_cell(model, sae)
    trace = trace_cell(model, tokens, cell, attention_mask=attention_mask, with_states=kind == "state" or config.write == "delta")
    codes = encode_trace(sae, trace, kind).float()
    if firings is None:
        max_offset = max(config.kl_offsets)
        valid = torch.ones(tokens.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        if max_offset:
            valid[:, tokens.shape[1] - max_offset :] = False
        firings = find_firings(codes, atoms=atoms, max_per_atom=config.max_firings_per_atom, valid=valid, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    atom_norms = _atom_norms(sae)
    records = []
    for firing in tqdm(firings, disable=not verbose, desc="substitution"):
        records.append(_test_firing(model, sae, cell, tokens, attention_mask, trace, codes, firing, config, generator, atom_norms))
    summary = summarize(records, config)
    summary["cell"] = {"layer": cell.layer, "head": cell.head, "sae_reads": kind, "hook": sae.cfg.metadata.hook_name}
    summary["config"] = asdict(config)
    result = SubstitutionResult(records, summary, config)
    if out_dir is not None:
        write_run(result, out_dir)
    return result


def _atom_norms(sae: Any) -> Tensor:
    with torch.no_grad():
        return sae.atom_matrices().flatten(1).norm(dim=-1).float().cpu()


@torch.no_grad()
def _test_firing(
    model: Any,
    sae: Any,
    cell: Cell,
    tokens: Tensor,
    attention_mask: Tensor | None,
    trace: Any,
    codes: Tensor,
    firing: Firing,
    config: SubstitutionConfig,
    generator: torch.Generator,
    atom_norms: Tensor,
) -> dict[str, Any]:
    b, t = firing.sequence, firing.position
    code = codes[b, t]
    atom = int(code.argmax()) if config.substitute == "dominant" else firing.atom
    coefficient = float(code[atom]) if config.substitute == "dominant" else firing.activation
    matrix = sae.atom_matrices(torch.tensor([atom]))[0].detach().float().cpu()
    native = trace.write(b, t).float()
    if config.write == "delta":
        before = trace.states[b, t - 1] if t > 0 else torch.zeros_like(native)
        native = (trace.states[b, t] - trace.log_decay[b, t].exp() * before).float()
    native_norm = float(native.norm())
    scale = coefficient if config.scale == "activation" else native_norm / max(float(atom_norms[atom]), 1e-30)
    atom_write = scale * matrix
    random_write = random_rank1(*native.shape, generator) * float(atom_write.norm())

    def edit(new: Tensor) -> list:
        return [replace_write(model, cell, t, new, definition=config.write, replaced=native)]

    conditions = [[], edit(atom_write), edit(torch.zeros_like(native)), edit(random_write)]
    until = t + 1 + max(config.kl_offsets)
    mask = None if attention_mask is None else attention_mask[b : b + 1]
    logits = fork(model, tokens[b : b + 1], t, conditions, until=until, attention_mask=mask)[:, 0]  # [cond, L, V]
    offsets = list(config.kl_offsets)
    base, edited = logits[0, offsets], logits[1:, :, :][:, offsets]
    if config.kl_direction == "edited||base":
        kls = kl_divergence(edited, base[None]).mean(-1)
    else:
        kls = kl_divergence(base[None], edited).mean(-1)
    top1 = logits[:, 0].argmax(-1).tolist()
    cos = float(torch.nn.functional.cosine_similarity(matrix.flatten(), native.flatten(), dim=0))
    fired_matrix = sae.atom_matrices(torch.tensor([firing.atom]))[0].detach().float().cpu()
    cos_firing = float(torch.nn.functional.cosine_similarity(fired_matrix.flatten(), native.flatten(), dim=0))
    kl_atom, kl_delete, kl_random = (float(k) for k in kls)
    return {
        "sequence": b,
        "position": t,
        "atom": firing.atom,
        "activation": firing.activation,
        "substituted_atom": atom,
        "coefficient": coefficient,
        "scale": scale,
        "write_norm": native_norm,
        "cos_substituted_to_write": cos,
        "cos_atom_to_write": cos_firing,
        "kl_atom": kl_atom,
        "kl_delete": kl_delete,
        "kl_random": kl_random,
        "win": kl_atom < kl_delete,
        "strict_chain": kl_atom < kl_delete < kl_random,
        "top1": {"base": top1[0], "atom": top1[1], "delete": top1[2], "random": top1[3]},
    }


def summarize(records: list[dict[str, Any]], config: SubstitutionConfig) -> dict[str, Any]:
    """The paper's statistics over per-firing records."""
    n = len(records)
    if n == 0:
        return {"n_firings": 0, "note": "no atom fired on these sequences"}
    kl = {c: np.array([r[f"kl_{c}"] for r in records]) for c in ("atom", "delete", "random")}
    wins = int(sum(r["win"] for r in records))
    atoms = [r["atom"] for r in records]
    win_values = np.array([float(r["win"]) for r in records])
    medians = {c: median_mad(v) for c, v in kl.items()}
    summary: dict[str, Any] = {
        "n_firings": n,
        "n_atoms": len(set(atoms)),
        "win_rate": wins / n,
        "win_rate_wilson95": wilson_interval(wins, n),
        "win_rate_cluster_bootstrap95": cluster_bootstrap(win_values, atoms, n_resamples=config.n_bootstrap, seed=config.seed),
        "strict_chain_rate": float(np.mean([r["strict_chain"] for r in records])),
        "wilcoxon_p_atom_vs_delete": paired_wilcoxon(kl["atom"], kl["delete"]),
        "cliffs_delta_delete_vs_atom": cliffs_delta(kl["delete"], kl["atom"]),
        "median_kl": {c: {"median": m, "mad_over_sqrt_n": e} for c, (m, e) in medians.items()},
        "kl_ratio_atom_delete_random": [1.0] + [
            medians[c][0] / medians["atom"][0] if medians["atom"][0] > 0 else float("inf") for c in ("delete", "random")
        ],
    }
    summary["population"] = _population(records, config)
    return summary


def _population(records: list[dict[str, Any]], config: SubstitutionConfig) -> dict[str, Any]:
    by_atom: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_atom.setdefault(r["atom"], []).append(r)
    eligible = {a: rs for a, rs in by_atom.items() if len(rs) >= config.min_firings}
    if not eligible:
        return {"n_atoms": 0, "note": f"no atom has {config.min_firings} firings"}
    rates = {a: float(np.mean([r["win"] for r in rs])) for a, rs in eligible.items()}
    cosines = {a: float(np.median([r["cos_atom_to_write"] for r in rs])) for a, rs in eligible.items()}
    partition = partition_atoms(cosines, threshold=config.register_threshold, seed=config.seed)
    values = np.array(list(rates.values()))
    ci = cluster_bootstrap(values, list(rates), n_resamples=config.n_bootstrap, seed=config.seed)
    reg = [rates[a] for a in partition.registers]
    bun = [rates[a] for a in partition.bundles]
    return {
        "n_atoms": len(eligible),
        "n_firings": int(sum(len(rs) for rs in eligible.values())),
        "mean_atom_win_rate": float(values.mean()),
        "mean_atom_win_rate_bootstrap95": ci,
        "registers": partition.registers,
        "bundles": partition.bundles,
        "delta_bic": partition.delta_bic,
        "register_mean_win_rate": float(np.mean(reg)) if reg else None,
        "bundle_mean_win_rate": float(np.mean(bun)) if bun else None,
        "register_vs_bundle_mannwhitney_p": mann_whitney(reg, bun) if reg and bun else None,
        "atoms": {a: {"win_rate": rates[a], "median_cos": cosines[a], "n": len(eligible[a])} for a in eligible},
    }


def write_run(result: SubstitutionResult, out_dir: str | Path) -> RunDir:
    """Records, summary, markdown report and plots of a substitution run."""
    run = RunDir(out_dir)
    run.write_records(result.records)
    run.write_summary(result.summary)
    s = result.summary
    plots = []
    if result.records:
        plt = plt_module()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.logspace(-8, 2, 41)
        for condition, color in (("atom", "tab:green"), ("delete", "tab:orange"), ("random", "tab:red")):
            values = np.clip([r[f"kl_{condition}"] for r in result.records], 1e-8, None)
            ax.hist(values, bins=bins, alpha=0.5, label=condition, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("KL to the unedited next-token distribution (nats)")
        ax.set_ylabel("firings")
        ax.legend()
        ax.set_title(f"substitution: atom wins {s['win_rate']:.1%} of {s['n_firings']} firings")
        plots.append(run.save_figure(fig, "kl_histogram.png"))
        pop = s["population"]
        if pop.get("n_atoms"):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            atoms = pop["atoms"]
            ax.scatter([v["median_cos"] for v in atoms.values()], [v["win_rate"] for v in atoms.values()], s=12)
            ax.set_xlabel("median cosine of atom to native write")
            ax.set_ylabel("per-atom win rate")
            ax.set_title("per-atom population test")
            plots.append(run.save_figure(fig, "win_rate_by_atom.png"))
    low, high = s.get("win_rate_wilson95", (float("nan"),) * 2)
    sections = [
        ("Settings", markdown_table([{k: str(v) for k, v in s.get("config", {}).items()}], list(s.get("config", {})))),
        (
            "Headline",
            f"Atom beats deletion on **{s.get('win_rate', float('nan')):.1%}** of {s['n_firings']} firings "
            f"(Wilson 95% [{low:.1%}, {high:.1%}]); strict chain atom < delete < random on "
            f"{s.get('strict_chain_rate', float('nan')):.1%}; paired Wilcoxon p = {s.get('wilcoxon_p_atom_vs_delete', float('nan')):.3g}; "
            f"Cliff's delta (delete vs atom) = {s.get('cliffs_delta_delete_vs_atom', float('nan')):+.3f}."
            if s["n_firings"]
            else "No firings.",
        ),
    ]
    if s["n_firings"]:
        rows = [{"condition": c, "median KL": v["median"], "MAD/sqrt(n)": v["mad_over_sqrt_n"]} for c, v in s["median_kl"].items()]
        sections.append(("Median KL", markdown_table(rows, ["condition", "median KL", "MAD/sqrt(n)"])))
        pop = s["population"]
        if pop.get("n_atoms"):
            sections.append((
                "Per-atom population test",
                f"{pop['n_atoms']} atoms with >= {result.config.min_firings} firings: mean per-atom win rate "
                f"{pop['mean_atom_win_rate']:.1%}; {len(pop['registers'])} registers / {len(pop['bundles'])} bundles "
                f"(delta BIC {pop['delta_bic']:.1f}).",
            ))
    run.write_report("Substitution test", sections, plots)
    return run
