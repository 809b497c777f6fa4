"""Passage NLL (paper Fig. 2b, §3.8): what every register firing's write is worth to a whole passage.

Per held-out passage, the cell's write is edited at *every* position where a register atom fires
(the natural firings of the unedited run), all at once, and the passage's next-token NLL is read in
bits per token under each condition:

- base: unedited;
- delete: every such write removed;
- atom: every such write replaced by the register atom that fires there (the largest code among
  the selected atoms), scaled as in the substitution test;
- random: every such write replaced by a random rank-1 matrix at the native write's Frobenius norm
  (``random_mode="replace"``, the paper's wording), or that random matrix added on top of the
  native write (``"add"``).

The paper reports the change from base: deleting costs +0.005 bits/token, random writes +0.226, a
41.87x gap that holds in 19 of 20 passages. The summary gives the mean change per condition, the
ratio random / delete, and the passages where random costs more than deleting (and where the atom
costs less than deleting). Every ambiguous choice is a `PassageNLLConfig` field whose default is
the paper's main text (docs/design.md §5).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.edits import set_writes
from hooked_recurrent.fork import fork

from .activity import Firing, partition_alive, scan_activity, select_firings
from .cell import sae_cell, trace_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, unit_generator
from .stats import paired_wilcoxon

__all__ = ["CONDITIONS", "PAPER_REFERENCE", "PassageNLL", "PassageNLLConfig", "PassageNLLRecord", "nll_bits",
           "run_passage_nll"]  # fmt: skip

PAPER_REFERENCE: dict[str, str] = {
    "table": "Fig. 2b",
    "model": "Qwen3.5-0.8B L9 H4, 20 OpenWebText passages",
    "value": "delete every register firing +0.005 bits/token vs matched-norm random rank-1 +0.226: 41.87x, "
    "holds in 19/20",
}
"""The paper's figure (paper-spec §3.8), for reports that put it beside a run's."""

CONDITIONS: tuple[str, ...] = ("delete", "atom", "random")
"""The edited conditions, each compared with the unedited passage."""


@dataclass
class PassageNLLConfig:
    """Choices of the passage-NLL comparison (defaults: the paper's main text; docs/design.md §5).

    Attributes:
        atoms: Whose firings are edited. ``"registers"``: every register atom of the partition of
            the alive atoms on these passages (the paper); ``"alive"``: every atom that fires.
        register_threshold: ``None``: the two-component mixture assigns registers (Fig. 2a); a
            number: register iff the atom's median cosine to the write is at least that.
        scale: The atom condition's scale: ``"activation"`` (the atom times its code, main text) or
            ``"matched_norm"`` (the native write's Frobenius norm, App. J).
        random_mode: ``"replace"``: the native write is replaced by the random one (the paper's
            "replacing with matched-norm random rank-1 writes"); ``"add"``: added on top of it.
        max_positions: Edit at most this many firing positions per passage (a seeded sample; None:
            all of them, the paper's "every register firing").
        seed: Seed of the random writes (and of the position sample).
    """

    atoms: Literal["registers", "alive"] = "registers"
    register_threshold: float | None = None
    scale: Literal["activation", "matched_norm"] = "activation"
    random_mode: Literal["replace", "add"] = "replace"
    max_positions: int | None = None
    seed: int = 2026

    def __post_init__(self) -> None:
        check_config(self, positive=("register_threshold", "max_positions"))


@dataclass
class PassageNLLRecord:
    """One passage.

    Attributes:
        passage: Sequence index.
        n_tokens: Next-token predictions scored (every position but the last).
        n_positions: Positions whose write was edited.
        n_firings: Firings of the selected atoms at those positions.
        nll_bits: Mean NLL in bits per token under ``base`` and each of `CONDITIONS`.
        delta_bits: Each condition's NLL minus the base NLL (bits per token).
    """

    passage: int
    n_tokens: int
    n_positions: int
    n_firings: int
    nll_bits: dict[str, float]
    delta_bits: dict[str, float]


def nll_bits(logits: Float[Tensor, "pos d_vocab"], tokens: Int[Tensor, " pos"]) -> float:
    """Mean next-token NLL of ``tokens[1:]`` given ``logits[:-1]``, in bits per token."""
    log_p = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-log_p.gather(-1, tokens[1:, None].to(log_p.device)).mean()) / math.log(2)


class PassageNLL(Protocol[PassageNLLRecord]):
    """The passage-NLL comparison as a protocol (run it with `run_protocol`, or `run_passage_nll`).

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE (on ``hook_state`` or ``hook_write``).
        tokens: Held-out passages (one row each, no padding).
        config: Protocol choices.
        atoms: Edit the firings of exactly these atoms (instead of ``config.atoms``).
        firings: Edit exactly these firings (position, atom and code) instead of scanning.
    """

    name, title, record_type = (
        "passage-nll",
        "Passage NLL: every register firing edited at once",
        PassageNLLRecord,
    )

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        config: PassageNLLConfig | None = None,
        atoms: list[int] | None = None,
        firings: list[Firing] | None = None,
    ) -> None:
        self.model, self.sae, self.tokens = model, sae, tokens
        self.config = config = config or PassageNLLConfig()
        self.cell, self.kind = sae_cell(model, sae)
        self.n_registers: int | None = None
        if firings is None:
            activity = scan_activity(model, sae, tokens, self.cell, self.kind)
            if atoms is None and config.atoms == "registers":
                partition = partition_alive(activity, config.register_threshold, config.seed)
                atoms, self.n_registers = partition.registers, len(partition.registers)
            firings = (
                select_firings(activity, atoms=atoms, max_per_atom=tokens.numel(), seed=config.seed)
                if atoms != []
                else []
            )
        self.firings = sorted(firings, key=lambda f: (f.sequence, f.position, -f.activation))
        with torch.no_grad():
            self.atom_norms = sae.get_W_dec_norm().float().cpu()

    def settings(self) -> dict[str, Any]:
        meta = self.sae.cfg.metadata
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {
                "layer": self.cell.layer,
                "head": self.cell.head,
                "sae_reads": self.kind,
                "hook": meta.hook_name,
            },
            "sae": {
                "d_sae": self.sae.cfg.d_sae,
                "k": self.sae.cfg.k,
                "variant": self.sae.cfg.variant,
            },
            "tokens": {
                "shape": list(self.tokens.shape),
                "sha1": hashlib.sha1(self.tokens.cpu().numpy().tobytes()).hexdigest(),
            },
            "n_firings": len(self.firings),
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[PassageNLLRecord]]]]:
        for b in range(self.tokens.shape[0]):
            yield f"passage-{b}", lambda b=b: self._passage(b)

    @torch.no_grad()
    def _passage(self, b: int) -> list[PassageNLLRecord]:
        config = self.config
        tokens = self.tokens[b : b + 1]
        mine = [f for f in self.firings if f.sequence == b]
        # One atom per position: the largest code among the selected atoms (firings are sorted so).
        top: dict[int, Firing] = {}
        for f in mine:
            top.setdefault(f.position, f)
        positions = sorted(top)
        generator = unit_generator(config.seed, f"passage-{b}")
        if config.max_positions is not None and len(positions) > config.max_positions:
            keep = torch.randperm(len(positions), generator=generator)[: config.max_positions]
            positions = sorted(positions[i] for i in keep.tolist())
        trace = trace_cell(self.model, tokens, self.cell)
        hook = self.cell.write_hook(self.model)
        writes = {"delete": {}, "atom": {}, "random": {}}
        for t in positions:
            native = trace.write(0, t).float()
            firing = top[t]
            atom = self.sae.atom_matrices(torch.tensor([firing.atom]))[0].detach().float().cpu()
            factor = (
                firing.activation
                if config.scale == "activation"
                else float(native.norm()) / float(self.atom_norms[firing.atom])
            )
            key = torch.randn(native.shape[0], generator=generator, dtype=torch.float64)
            value = torch.randn(native.shape[1], generator=generator, dtype=torch.float64)
            random = torch.outer(key, value).float()
            random = random * (native.norm() / random.norm().clamp(min=1e-30))
            writes["delete"][t] = torch.zeros_like(native)
            writes["atom"][t] = factor * atom
            writes["random"][t] = random if config.random_mode == "replace" else native + random
        conditions = [[]] + [[(hook, set_writes(writes[c]))] if positions else [] for c in CONDITIONS]
        logits = fork(self.model, tokens, 0, conditions)[:, 0].float().cpu()  # [1 + conditions, pos, vocab]
        nll = {name: nll_bits(logits[i], tokens[0]) for i, name in enumerate(("base", *CONDITIONS))}
        edited = set(positions)
        return [PassageNLLRecord(
            passage=b, n_tokens=tokens.shape[1] - 1, n_positions=len(positions),
            n_firings=sum(f.position in edited for f in mine), nll_bits=nll,
            delta_bits={c: nll[c] - nll["base"] for c in CONDITIONS},
        )]  # fmt: skip

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[PassageNLLRecord]) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "n_passages": len(records),
            "n_registers": self.n_registers,
        }
        if not records:
            return summary
        deltas = {c: np.array([r.delta_bits[c] for r in records]) for c in CONDITIONS}
        weights = np.array([r.n_tokens for r in records], float)
        mean = {c: float(np.average(deltas[c], weights=weights)) for c in CONDITIONS}
        ratio = mean["random"] / mean["delete"] if mean["delete"] != 0 else float("inf")
        random_worse = int((deltas["random"] > deltas["delete"]).sum())
        atom_better = int((deltas["atom"] < deltas["delete"]).sum())
        n = len(records)
        summary.update({
            "edited_fraction": float(sum(r.n_positions for r in records) / sum(r.n_tokens + 1 for r in records)),
            "mean_delta_bits": mean,
            "median_delta_bits": {c: float(np.median(deltas[c])) for c in CONDITIONS},
            "base_bits_per_token": float(np.average([r.nll_bits["base"] for r in records], weights=weights)),
            "random_over_delete": ratio,
            "passages_random_above_delete": random_worse,
            "passages_atom_below_delete": atom_better,
            "wilcoxon_p_random_vs_delete": paired_wilcoxon(deltas["random"], deltas["delete"]),
            "wilcoxon_p_atom_vs_delete": paired_wilcoxon(deltas["atom"], deltas["delete"]),
        })  # fmt: skip
        summary["headline"] = {
            "delete_bits_per_token": mean["delete"],
            "random_bits_per_token": mean["random"],
            "atom_bits_per_token": mean["atom"],
            "random_over_delete": ratio,
            "holds_in": f"{random_worse}/{n}",
            "n_passages": n,
        }
        return summary

    def report(self, summary: dict[str, Any], records: list[PassageNLLRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Headline", "No passages.")]
        h, n = summary["headline"], summary["n_passages"]
        sections.append((
            "Headline",
            (f"Editing the write at every firing of the selected atoms ({summary['edited_fraction']:.1%} of positions) "
             "changes "
            f"the passage NLL by **{h['delete_bits_per_token']:+.4f}** bits/token when deleted and "
            f"**{h['random_bits_per_token']:+.4f}** bits/token with matched-norm random rank-1 writes "
            f"({self.config.random_mode}): "
            f"random / delete = {h['random_over_delete']:.3g}x; random costs more than deleting in {h['holds_in']} "
            "passages "
            f"(paired Wilcoxon p = {summary['wilcoxon_p_random_vs_delete']:.3g}). The atoms in place of the writes: "
            f"{h['atom_bits_per_token']:+.4f} bits/token, below deletion in "
            f"{summary['passages_atom_below_delete']}/{n} passages. "
            f"Paper ({PAPER_REFERENCE['model']}, a different model): {PAPER_REFERENCE['value']}."),
        ))  # fmt: skip
        rows = [{"passage": r.passage, "positions": r.n_positions, "base": r.nll_bits["base"],
                 **{c: r.delta_bits[c] for c in CONDITIONS}} for r in records]  # fmt: skip
        sections.append(
            (
                "Per passage (bits/token; edits as change from base)",
                markdown_table(rows, ["passage", "positions", "base", *CONDITIONS]),
            )
        )
        return sections

    def plots(self, summary: dict[str, Any], records: list[PassageNLLRecord], plt: Any) -> dict[str, Any]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(records))
        for i, (c, color) in enumerate(zip(CONDITIONS, ("tab:orange", "tab:green", "tab:red"))):
            ax.bar(
                x + (i - 1) * 0.27,
                [r.delta_bits[c] for r in records],
                width=0.27,
                color=color,
                label=c,
            )
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("passage")
        ax.set_ylabel("NLL change (bits/token)")
        ax.legend()
        ax.set_title(f"random / delete = {summary['headline']['random_over_delete']:.3g}x")
        return {"passage_nll.png": fig}


def run_passage_nll(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: PassageNLLConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[PassageNLLRecord]:
    """Run the passage-NLL comparison of an SAE's register firings on held-out passages.

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE.
        tokens: Held-out passages (the paper: 20 OpenWebText passages).
        config: Protocol choices.
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the passages.
        **options: `PassageNLL`'s keyword arguments (``atoms``, ``firings``).

    Returns:
        One `PassageNLLRecord` per passage and the summary (``summary["headline"]``).
    """
    return run_protocol(
        PassageNLL(model, sae, tokens, config=config, **options),
        out_dir,
        mode=mode,
        verbose=verbose,
    )
