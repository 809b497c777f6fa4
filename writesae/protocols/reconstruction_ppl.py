"""Downstream perplexity with a cell's state replaced by its SAE reconstruction (paper Table 14, App. J, §2.7).

Each sequence runs unedited up to position ``P`` (the paper: 511). The state after ``P`` of one head
is replaced by its SAE's reconstruction (``S_P -> SAE(S_P)``; the read at ``P`` and every later
position see it, and the recurrence continues from it), and the teacher-forced loss is read on the
tokens after ``P`` (the paper: 512-1023). With one SAE per head of a layer the replacement is done
head by head and for all heads at once; with several sets of SAEs (e.g. rank-1 and rank-2 atoms,
``WriteSAEConfig.rank``) each set is measured the same way. Zeroing the state (per head, and all
heads) is measured beside them as the floor a reconstruction should stay far from.

The paper reports the % change of perplexity against the unmodified model: +0.76% for all 16
heads of Qwen3.5-0.8B L9 with rank-1 atoms, +0.82% with rank-2 (PPL 20.347 vs 20.360); the model
card gives +0.58% for L9 H4 alone. The cache edit is built from `hooked_recurrent.edits`
(``add_to_states`` of ``SAE(S_P) - S_P``), one batched fork per group of sequences.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_recurrent.edits import add_to_states
from hooked_recurrent.fork import TOKENS_PER_PASS, on_rows

from .cell import Cell, sae_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol
from .walk import SequenceWalk

__all__ = ["PAPER_REFERENCE", "ReconstructionPPL", "ReconstructionPPLConfig", "ReconstructionPPLRecord",
           "run_reconstruction_ppl", "sae_sets"]  # fmt: skip

PAPER_REFERENCE: dict[str, str] = {
    "table": "Table 14 / App. J",
    "model": "Qwen3.5-0.8B L9 (500 OpenWebText sequences, state replaced after position 511)",
    "value": "all 16 heads: +0.76% PPL (rank-1) vs +0.82% (rank-2), PPL 20.347 vs 20.360; L9 H4 alone +0.58% "
    "(model card)",
}
"""The paper's figures (paper-spec §2.7, §3.9), for reports that put them beside a run's."""


@dataclass
class ReconstructionPPLConfig:
    """Choices of the reconstruction-perplexity measurement (docs/design.md §5).

    Attributes:
        position: ``P``: the state after this position is replaced (paper: 511, with 1,024-token
            sequences); the loss is read on the tokens after it.
        all_heads: Also replace every head of a set at once (the paper's all-16-head figure).
        sequences_per_unit: Sequences walked together (one unit of the record log; the records do
            not depend on it).
    """

    position: int = 511
    all_heads: bool = True
    sequences_per_unit: int = 8

    def __post_init__(self) -> None:
        check_config(self, positive=("sequences_per_unit",), nonnegative=("position",))


@dataclass
class ReconstructionPPLRecord:
    """One sequence.

    Attributes:
        sequence: Sequence index.
        n_tokens: Tokens scored (those after ``P``).
        nll: Summed NLL in nats of those tokens per condition: ``base``, ``zero/H{h}``,
            ``zero/all``, ``{set}/H{h}``, ``{set}/all``.
    """

    sequence: int
    n_tokens: int
    nll: dict[str, float]


def sae_sets(saes: Any) -> dict[str, list[Any]]:
    """``{label: [per-head SAEs of one layer]}`` from one SAE, a list, or a mapping of labelled lists.

    A plain list is split by atom rank, labelled ``"rank-{r}"`` (each label's SAEs on distinct heads).

    Raises:
        ValueError: no SAE, two SAEs of one set on the same head, or SAEs of different layers.
    """
    if isinstance(saes, Mapping):
        sets = {str(label): list(group) for label, group in saes.items()}
    else:
        group = [saes] if not isinstance(saes, Sequence) else list(saes)
        sets: dict[str, list[Any]] = {}
        for sae in group:
            sets.setdefault(f"rank-{sae.cfg.rank}", []).append(sae)
    if not any(sets.values()):
        raise ValueError("reconstruction-ppl needs at least one SAE")
    return sets


class ReconstructionPPL(Protocol[ReconstructionPPLRecord]):
    """The reconstruction-perplexity measurement (run it with `run_protocol`, or `run_reconstruction_ppl`).

    Args:
        model: The hooked model.
        sae: One state SAE, per-head state SAEs of one layer, or ``{label: [SAEs]}`` (see `sae_sets`).
        tokens: Held-out sequences longer than ``config.position + 1`` (no padding).
        config: Protocol choices.
    """

    name, title, record_type = (
        "reconstruction-ppl",
        "Perplexity with the state replaced by its reconstruction",
        ReconstructionPPLRecord,
    )

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        config: ReconstructionPPLConfig | None = None,
    ) -> None:
        self.model, self.tokens = model, tokens
        self.config = config = config or ReconstructionPPLConfig()
        self.sets = sae_sets(sae)
        self.heads: dict[str, dict[int, Any]] = {}
        layers = set()
        for label, group in self.sets.items():
            self.heads[label] = {}
            for s in group:
                cell, kind = sae_cell(model, s)
                if kind != "state":
                    raise ValueError(
                        f"{s.cfg.metadata.hook_name} is a write SAE; reconstruction-ppl replaces states: "
                        "give state SAEs"
                    )
                if cell.head in self.heads[label]:
                    raise ValueError(f"set {label!r} has two SAEs on head {cell.head}; give one SAE per head and set")
                self.heads[label][cell.head] = s
                layers.add(cell.layer)
        if len(layers) != 1:
            raise ValueError(f"the SAEs read layers {sorted(layers)}; give SAEs of one layer (one run per layer)")
        self.layer = layers.pop()
        self.all_heads = sorted({h for group in self.heads.values() for h in group})
        length, p = tokens.shape[1], config.position
        if not 0 <= p <= length - 2:
            raise ValueError(
                f"position={p} leaves no token to score in sequences of {length} tokens: use sequences longer than "
                f"position + 1 (the paper: 1,024 tokens, position 511) or a smaller position"
            )

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "layer": self.layer,
            "saes": {
                label: {
                    str(h): {
                        "d_sae": s.cfg.d_sae,
                        "k": s.cfg.k,
                        "rank": s.cfg.rank,
                        "variant": s.cfg.variant,
                    }
                    for h, s in sorted(group.items())
                }
                for label, group in self.heads.items()
            },
            "tokens": {
                "shape": list(self.tokens.shape),
                "sha1": hashlib.sha1(self.tokens.cpu().numpy().tobytes()).hexdigest(),
            },
        }

    def conditions(self) -> list[str]:
        """Every condition's name, in record order."""
        names = ["base"] + [f"zero/H{h}" for h in self.all_heads]
        if self.config.all_heads and len(self.all_heads) > 1:
            names.append("zero/all")
        for label, group in self.heads.items():
            names += [f"{label}/H{h}" for h in sorted(group)]
            if self.config.all_heads and len(group) > 1:
                names.append(f"{label}/all")
        return names

    def units(
        self,
    ) -> Iterable[tuple[str, Callable[[], list[ReconstructionPPLRecord]]]]:
        n, size = self.tokens.shape[0], self.config.sequences_per_unit
        for first in range(0, n, size):
            rows = list(range(first, min(n, first + size)))
            yield f"seq-{rows[0]}-{rows[-1]}", lambda rows=rows: self._sequences(rows)

    @torch.no_grad()
    def _sequences(self, rows: list[int]) -> list[ReconstructionPPLRecord]:
        p, tokens = self.config.position, self.tokens[rows]
        walk = SequenceWalk(self.model, tokens)
        after = walk.cache_at(p).clone()
        self.model(tokens[:, p : p + 1], cache=after, return_type=None)
        states = after.state(self.layer).clone()  # S_P of every head [batch, head, d_k, d_v]
        deltas: dict[str, dict[int, Tensor]] = {}  # condition -> head -> S'_P - S_P [batch, d_k, d_v]
        for h in self.all_heads:
            deltas[f"zero/H{h}"] = {h: -states[:, h]}
        if "zero/all" in self.conditions():
            deltas["zero/all"] = {h: -states[:, h] for h in self.all_heads}
        for label, group in self.heads.items():
            changes = {}
            for h, sae in group.items():
                recon = sae(states[:, h].to(sae.device, sae.dtype)).to(states)
                changes[h] = recon - states[:, h]
                deltas[f"{label}/H{h}"] = {h: changes[h]}
            if f"{label}/all" in self.conditions():
                deltas[f"{label}/all"] = changes
        names = self.conditions()
        conditions = []
        for i in range(len(rows)):
            for name in names:
                edits = deltas.get(name, {})
                conditions.append(
                    (
                        i,
                        [
                            (
                                Cell(self.layer, h).state_hook(self.model),
                                add_to_states(p, d[i]),
                            )
                            for h, d in edits.items()
                        ],
                    )
                )
        logits = self._continue(walk, tokens, conditions)  # [rows * conditions, L - 1 - p, V]
        targets = tokens[:, p + 1 :].to(logits.device)
        records = []
        for i, b in enumerate(rows):
            nll = {}
            for j, name in enumerate(names):
                log_p = torch.log_softmax(logits[i * len(names) + j].double(), dim=-1)
                nll[name] = float(-log_p.gather(-1, targets[i, :, None]).sum())
            records.append(ReconstructionPPLRecord(sequence=b, n_tokens=targets.shape[1], nll=nll))
        return records

    def _continue(self, walk: SequenceWalk, tokens: Tensor, conditions: list[tuple[int, list]]) -> Tensor:
        """Logits of positions ``P .. L-2`` under each ``(row, hooks)`` condition.

        The state edits sit at ``P`` only, so only that position runs with hooks (a state hook
        materialises every state of its call); the rest continues each edited cache unhooked, in
        groups of about ``TOKENS_PER_PASS`` tokens.
        """
        p, end = self.config.position, tokens.shape[1] - 1
        group = max(1, TOKENS_PER_PASS // (end - p))
        logits = []
        for first in range(0, len(conditions), group):
            part = conditions[first : first + group]
            rows = [row for row, _ in part]
            cache = walk.cache_at(p).select(rows)
            hooks = [(name, on_rows(fn, j, j + 1)) for j, (_, edits) in enumerate(part) for name, fn in edits]
            at_p = self.model.run_with_hooks(tokens[rows, p : p + 1], cache=cache, fwd_hooks=hooks)
            after = [self.model(tokens[rows, p + 1 : end], cache=cache)] if end > p + 1 else []
            logits.append(torch.cat([at_p, *after], dim=1))
        return torch.cat(logits)

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[ReconstructionPPLRecord]) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "n_sequences": len(records),
            "position": self.config.position,
            "layer": self.layer,
        }
        if not records:
            return summary
        tokens = sum(r.n_tokens for r in records)
        ppl = {c: math.exp(sum(r.nll[c] for r in records) / tokens) for c in self.conditions()}
        change = {c: 100.0 * (ppl[c] / ppl["base"] - 1.0) for c in ppl}
        summary.update({"n_tokens": tokens, "perplexity": ppl, "pct_change": change})
        rows = []
        for label in ("zero", *self.heads):
            heads = self.all_heads if label == "zero" else sorted(self.heads[label])
            row = {"set": label, **{f"H{h}": change[f"{label}/H{h}"] for h in heads}}
            if f"{label}/all" in change:
                row["all"] = change[f"{label}/all"]
            rows.append(row)
        summary["table"] = rows
        headline: dict[str, Any] = {
            "base_perplexity": ppl["base"],
            "n_sequences": len(records),
        }
        for label, group in self.heads.items():
            key = f"{label}/all" if f"{label}/all" in change else f"{label}/H{min(group)}"
            headline[f"{label}_pct_change" + ("_all_heads" if key.endswith("/all") else f"_H{min(group)}")] = change[
                key
            ]
            headline[f"{label}_perplexity"] = ppl[key]
        zero = "zero/all" if "zero/all" in change else f"zero/H{self.all_heads[0]}"
        headline["zeroed_state_pct_change"] = change[zero]
        summary["headline"] = headline
        return summary

    def report(self, summary: dict[str, Any], records: list[ReconstructionPPLRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Headline", "No sequences.")]
        columns = (
            ["set"] + [f"H{h}" for h in self.all_heads] + (["all"] if any("all" in r for r in summary["table"]) else [])
        )
        sentences = [
            f"{label}: {summary['headline'][key]:+.3f}%"
            for label in self.heads
            for key in summary["headline"]
            if key.startswith(f"{label}_pct")
        ]
        sections.append((
            "Headline",
            (f"Replacing layer {self.layer}'s state after position {self.config.position} by its SAE reconstruction "
             "changes the "
             f"perplexity of the {summary['n_tokens']} tokens after it (base {summary['perplexity']['base']:.4g}) by "
             + "; ".join(sentences)
             + f". Zeroing the state instead: {summary['headline']['zeroed_state_pct_change']:+.3f}%. "
             f"Paper ({PAPER_REFERENCE['model']}, a different model): {PAPER_REFERENCE['value']}."),
        ))  # fmt: skip
        sections.append(
            (
                "% change of perplexity per head and for all heads",
                markdown_table(summary["table"], columns),
            )
        )
        return sections

    def plots(self, summary: dict[str, Any], records: list[ReconstructionPPLRecord], plt: Any) -> dict[str, Any]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"H{h}" for h in self.all_heads] + (["all"] if any("all" in r for r in summary["table"]) else [])
        x = np.arange(len(labels))
        sets = [r for r in summary["table"] if r["set"] != "zero"]
        for i, row in enumerate(sets):
            width = 0.8 / len(sets)
            ax.bar(x + (i - (len(sets) - 1) / 2) * width, [row.get(c, np.nan) for c in labels], width=width,
                   label=row["set"])  # fmt: skip
        ax.set_xticks(x, labels)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_ylabel("perplexity change (%)")
        ax.legend()
        ax.set_title(f"layer {self.layer}, state replaced after position {self.config.position}")
        return {"pct_change.png": fig}


def run_reconstruction_ppl(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: ReconstructionPPLConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
) -> ProtocolResult[ReconstructionPPLRecord]:
    """Measure the perplexity change when a layer's head states are replaced by their SAE reconstructions.

    Args:
        model: The hooked model.
        sae: One state SAE, per-head SAEs of one layer, or ``{label: [SAEs]}`` (see `sae_sets`).
        tokens: Held-out sequences longer than ``config.position + 1``.
        config: Protocol choices.
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the groups of sequences.

    Returns:
        One `ReconstructionPPLRecord` per sequence and the summary (``summary["headline"]``).
    """
    return run_protocol(
        ReconstructionPPL(model, sae, tokens, config=config),
        out_dir,
        mode=mode,
        verbose=verbose,
    )
