"""Reader traces (paper §6.8, Table 1, Fig. 11d): which later heads read what a register atom wrote?

At each firing of an atom (position ``t``, code ``a_i(t)``) the atom's contribution ``a_i(t) A_i`` is
removed from the head's state (``edit="ablate"``; ``"amplify"`` adds it once more), and the model
continues for ``window`` positions. A *reader* is a later head whose output moves: for an attention
head, its output ``z`` (``hook_z``, before the output projection); for a recurrent head, its read
``o_t`` (``hook_recurrence_out``). Its *signal* is the mean over the window of ``||z_edited - z||``.
The *baseline* is the same quantity for matched-norm random rank-1 edits of the state (``n_random``
draws, averaged), so the ratio signal / baseline says how much more a head reads this atom's
direction than an arbitrary direction of the same size; the paper reports top readers at 3-7x.
Readers are ranked per atom by that ratio, with the mean signal and baseline over the atom's
firings (a ratio of means).

Only heads in layers after the atom's layer can read it (the paper's Table 1 lists readers at L5
and L8 of an L9 write, which a causal forward pass cannot produce; they are not reproduced here).
A model with no attention layer after the cell (Mamba-2) has no attention reader: the protocol
refuses it and names ``reader_kinds=("recurrent",)``, which ranks later recurrent heads instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_recurrent.edits import add_to_states

from .activity import partition_alive, scan_activity, select_firings
from .cell import sae_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, token_fingerprint, unit_generator
from .selectivity import random_rank1
from .walk import SequenceWalk

__all__ = ["PAPER_REFERENCE", "ReaderRecord", "Readers", "ReadersConfig", "reader_heads", "run_readers"]

PAPER_REFERENCE = {
    "table": "Table 1, Fig. 11d (App. I.2)",
    "model": "Qwen3.5-0.8B L9 H4 register atoms",
    "value": "F53 -> L5 H5 at 6.9x, F63 -> L17 H4 at 5.2x, F1335 -> L21 H10 at 7.5x (top readers at 3-7x baseline)",
}

READ_HOOKS = {"attention": "hook_z", "recurrent": "hook_recurrence_out"}
"""The hook whose per-head output counts as a head's read, for each kind of reader."""


@dataclass
class ReadersConfig:
    """Choices of the reader traces (docs/design.md §5; the paper does not describe its method).

    Attributes:
        reader_kinds: Which later heads may be readers: ``"attention"`` (the paper's attention
            heads) and/or ``"recurrent"`` (later matrix-recurrent heads' reads).
        edit: ``"ablate"``: the atom's contribution ``a_i(t) A_i`` is subtracted from the state at
            its firing; ``"amplify"``: added once more.
        n_random: Matched-norm random rank-1 edits averaged into the baseline at each firing.
        window: Positions ``t .. t + window - 1`` whose head outputs are compared.
        atom_pool: ``"registers"``: the most frequent register atoms of the partition of every alive
            atom (the paper traces register atoms); ``"frequent"``: the most frequent atoms.
        n_atoms: Atoms traced (the paper shows three exemplars).
        register_threshold: ``None``: the two-component mixture assigns registers (as the
            substitution test); a number: register iff median cosine to the write >= it.
        max_firings_per_atom: Firings per atom (a seeded sample).
        top_readers: Readers listed per atom in the report.
        seed: Seed of the firing sample and of the random edits.
        scan_batch_size: Sequences encoded at once when scanning the codes.
    """

    reader_kinds: tuple[str, ...] = ("attention",)
    edit: Literal["ablate", "amplify"] = "ablate"
    n_random: int = 4
    window: int = 16
    atom_pool: Literal["registers", "frequent"] = "registers"
    n_atoms: int = 3
    register_threshold: float | None = None
    max_firings_per_atom: int = 30
    top_readers: int = 5
    seed: int = 2026
    scan_batch_size: int = 8

    def __post_init__(self) -> None:
        check_config(self, positive=("n_random", "window", "n_atoms", "max_firings_per_atom", "top_readers",
                                     "scan_batch_size"), nonempty=("reader_kinds",))  # fmt: skip
        bad = [k for k in self.reader_kinds if k not in READ_HOOKS]
        if bad:
            raise ValueError(f"ReadersConfig.reader_kinds={self.reader_kinds!r}: {bad} not among {list(READ_HOOKS)}")


@dataclass
class ReaderRecord:
    """One traced firing.

    Attributes:
        sequence: Sequence index.
        position: Firing position ``t``.
        atom: The atom.
        activation: Its code at ``t``.
        norm: Frobenius norm of the edit (and of each random edit).
        signal: Per reader head (``"L{layer} H{head}"``), mean ``||output change||`` over the window.
        baseline: The same for the random edits (mean over the draws).
    """

    sequence: int
    position: int
    atom: int
    activation: float
    norm: float
    signal: dict[str, float]
    baseline: dict[str, float]


def reader_heads(model: Any, layer: int, kinds: Iterable[str]) -> list[tuple[int, str, int]]:
    """``(layer, kind, n_heads)`` of every layer after ``layer`` whose heads can read it.

    Raises:
        ValueError: No such layer (e.g. attention readers in a model without attention): the
            message names the model's layer types and the other kind of reader.
    """
    cfg, kinds = model.cfg, list(kinds)
    found = []
    for l in range(layer + 1, cfg.n_layers):
        if "recurrent" in kinds and l in cfg.recurrent_layers:
            found.append((l, "recurrent", cfg.n_heads))
        elif "attention" in kinds and cfg.layer_types[l] == "attention":
            found.append((l, "attention", cfg.n_attn_heads))
    if not found:
        other = "recurrent" if "attention" in kinds else "attention"
        raise ValueError(
            f"{cfg.model_name} has no {' or '.join(kinds)} layer after layer {layer} (layer types {cfg.layer_types}), "
            f"so no {' or '.join(kinds)} head can read an atom written there. Use reader_kinds=('{other}',) "
            f"(--readers {other}) to rank later {other} heads instead, or an SAE of an earlier layer."
        )
    return found


class Readers(Protocol[ReaderRecord]):
    """The reader traces (run them with `run_protocol`, or `run_readers`).

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE.
        tokens: Held-out sequences ``[batch, pos]`` without padding.
        config: Protocol choices.
        atoms: Atoms to trace (default: from ``atom_pool``).
    """

    name, title, record_type = "readers", "Reader traces of register atoms", ReaderRecord

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        config: ReadersConfig | None = None,
        atoms: list[int] | None = None,
    ) -> None:
        self.model, self.sae, self.tokens = model, sae, tokens
        self.config = config = config or ReadersConfig()
        self.cell, self.kind = sae_cell(model, sae)
        self.readers = reader_heads(model, self.cell.layer, config.reader_kinds)  # refuses a model with none
        activity = scan_activity(model, sae, tokens, self.cell, self.kind, batch_size=config.scan_batch_size)
        partition = partition_alive(activity, config.register_threshold, config.seed)
        self.classes = {a: "register" for a in partition.registers} | {a: "bundle" for a in partition.bundles}
        if atoms is None:
            frequent = activity.frequent_atoms(activity.d_sae)
            pool = [a for a in frequent if config.atom_pool == "frequent" or a in set(partition.registers)]
            atoms = pool[: config.n_atoms]
        self.atoms = list(atoms)
        valid = torch.ones(tokens.shape, dtype=torch.bool)
        valid[:, tokens.shape[1] - 1 :] = False  # a firing at the last position has nothing after it to read it
        self.firings = select_firings(activity, atoms=self.atoms, max_per_atom=config.max_firings_per_atom, valid=valid,
                                      seed=config.seed)  # fmt: skip
        with torch.no_grad():
            self.matrices = {a: sae.atom_matrices([a])[0].detach().float().cpu() for a in self.atoms}

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head, "sae_reads": self.kind},
            "sae": {"d_sae": self.sae.cfg.d_sae, "k": self.sae.cfg.k, "variant": self.sae.cfg.variant},
            "atoms": self.atoms,
            "tokens": token_fingerprint(self.tokens),
            "n_firings": len(self.firings),
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[ReaderRecord]]]]:
        for b in sorted({f.sequence for f in self.firings}):
            yield f"seq-{b}", lambda b=b: self._sequence(b)

    # ------------------------------------------------------------------ one sequence

    def _capture(self, store: dict[str, Tensor]) -> list[tuple[str, Callable]]:
        """Hooks keeping each reader layer's per-head output of one condition."""

        def keep(name: str) -> Callable:
            def hook(x: Tensor, hook: Any) -> Tensor:
                store[name] = x.detach().float().cpu()  # [1, pos, head, d]
                return x

            return hook

        names = [self.model.cfg.hook_name(l, READ_HOOKS[kind]) for l, kind, _ in self.readers]
        return [(name, keep(name)) for name in names]

    @torch.no_grad()
    def _sequence(self, b: int) -> list[ReaderRecord]:
        config, cfg = self.config, self.model.cfg
        tokens = self.tokens[b : b + 1]
        generator = unit_generator(config.seed, f"seq-{b}")
        walk = SequenceWalk(self.model, tokens)
        state = self.cell.state_hook(self.model)
        sign = -1.0 if config.edit == "ablate" else 1.0
        records = []
        for f in sorted((f for f in self.firings if f.sequence == b), key=lambda f: (f.position, f.atom)):
            t = f.position
            edit = sign * f.activation * self.matrices[f.atom]
            norm = float(edit.norm())
            edits = [edit] + [norm * random_rank1(cfg.d_k, cfg.d_v, generator) for _ in range(config.n_random)]
            stores: list[dict[str, Tensor]] = [{} for _ in range(len(edits) + 1)]
            conditions = [(0, self._capture(stores[0]))]
            for i, e in enumerate(edits, start=1):
                conditions.append((0, [(state, add_to_states(t, e)), *self._capture(stores[i])]))
            walk.fork_rows(t, conditions, until=min(t + config.window, tokens.shape[1]))
            changes = [self._head_changes(stores[0], s) for s in stores[1:]]
            baseline = {k: float(np.mean([c[k] for c in changes[1:]])) for k in changes[0]}
            records.append(ReaderRecord(sequence=b, position=t, atom=f.atom, activation=f.activation, norm=norm,
                                        signal=changes[0], baseline=baseline))  # fmt: skip
        return records

    def _head_changes(self, base: dict[str, Tensor], edited: dict[str, Tensor]) -> dict[str, float]:
        """``"L{l} H{h}" -> mean over positions of ||edited - base||`` of that head's output."""
        out = {}
        for l, kind, _ in self.readers:
            name = self.model.cfg.hook_name(l, READ_HOOKS[kind])
            change = (edited[name] - base[name]).norm(dim=-1).mean(dim=(0, 1))  # [head]
            out.update({f"L{l} H{h}": float(c) for h, c in enumerate(change)})
        return out

    # ------------------------------------------------------------------ summary

    def _ranking(self, records: list[ReaderRecord]) -> list[dict[str, Any]]:
        rows = []
        for atom in self.atoms:
            mine = [r for r in records if r.atom == atom]
            if not mine:
                continue
            heads = list(mine[0].signal)
            signal = {h: float(np.mean([r.signal[h] for r in mine])) for h in heads}
            baseline = {h: float(np.mean([r.baseline[h] for r in mine])) for h in heads}
            ratio = {h: signal[h] / baseline[h] if baseline[h] > 0 else 0.0 for h in heads}
            atom_class = self.classes.get(atom, "unknown")
            for rank, h in enumerate(sorted(heads, key=lambda h: (-ratio[h], h)), start=1):
                rows.append({"atom": atom, "atom_class": atom_class, "rank": rank, "reader": h, "ratio": ratio[h],
                             "signal": signal[h], "baseline": baseline[h], "n_firings": len(mine)})  # fmt: skip
        return rows

    def summarize(self, records: list[ReaderRecord]) -> dict[str, Any]:
        ranking = self._ranking(records)
        tops = [row for row in ranking if row["rank"] == 1]
        headline: dict[str, Any] = {"n_firings": len(records), "n_atoms": len(tops),
                                    "reader_kinds": ",".join(self.config.reader_kinds),
                                    "n_reader_heads": sum(n for _, _, n in self.readers)}  # fmt: skip
        for row in tops:
            headline[f"F{row['atom']}_top_reader"] = row["reader"]
            headline[f"F{row['atom']}_ratio"] = row["ratio"]
        if tops:
            headline["median_top_ratio"] = float(np.median([row["ratio"] for row in tops]))
        return {"headline": headline, "ranking": ranking, "readers": [f"L{l} {kind}" for l, kind, _ in self.readers],
                "paper_reference": PAPER_REFERENCE}  # fmt: skip

    def report(self, summary: dict[str, Any], records: list[ReaderRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Results", "No firings of the chosen atoms (no register atom fired?).")]
        ref = PAPER_REFERENCE
        tops = [row for row in summary["ranking"] if row["rank"] == 1]
        lines = ", ".join(f"F{r['atom']} ({r['atom_class']}) -> {r['reader']} at {r['ratio']:.2f}x" for r in tops)
        sections.append(("Headline", (
            f"Cell L{self.cell.layer} H{self.cell.head}; edit `{self.config.edit}` of each atom at its firings, signal "
            f"over matched-norm random rank-1 edits, readers among {', '.join(summary['readers'])}: {lines}.\n\n"
            f"Paper ({ref['table']}, {ref['model']}; a different model): {ref['value']}.")))  # fmt: skip
        shown = [row for row in summary["ranking"] if row["rank"] <= self.config.top_readers]
        sections.append(("Ranked readers per atom", markdown_table(
            shown, ["atom", "atom_class", "rank", "reader", "ratio", "signal", "baseline", "n_firings"])))  # fmt: skip
        return sections

    def plots(self, summary: dict[str, Any], records: list[ReaderRecord], plt: Any) -> dict[str, Any]:
        atoms = sorted({row["atom"] for row in summary["ranking"]})
        heads = sorted({row["reader"] for row in summary["ranking"]},
                       key=lambda h: tuple(int(x[1:]) for x in h.split()))  # fmt: skip
        grid = np.zeros((len(atoms), len(heads)))
        for row in summary["ranking"]:
            grid[atoms.index(row["atom"]), heads.index(row["reader"])] = row["ratio"]
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(heads) + 2), 0.5 * len(atoms) + 1.5))
        image = ax.imshow(grid, aspect="auto", cmap="magma")
        fig.colorbar(image, ax=ax, label="signal / random baseline")
        ax.set_xticks(range(len(heads)), heads, rotation=90, fontsize=7)
        ax.set_yticks(range(len(atoms)), [f"F{a}" for a in atoms])
        fig.tight_layout()
        return {"readers.png": fig}

    def tables(self, summary: dict[str, Any], records: list[ReaderRecord]) -> dict[str, list[Any]]:
        return {"readers": summary["ranking"]}


def run_readers(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: ReadersConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[ReaderRecord]:
    """Rank the later heads that read an SAE's register atoms.

    Args:
        model: The hooked model.
        sae: A per-head WriteSAE.
        tokens: Held-out sequences without padding.
        config: Protocol choices (`ReadersConfig`).
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the sequences.
        **options: `Readers`' keyword arguments (``atoms``).

    Returns:
        One `ReaderRecord` per firing; ``summary["ranking"]`` ranks the readers of each atom.

    Raises:
        ValueError: No layer after the SAE's can hold a reader of the asked kind (see `reader_heads`).
    """
    return run_protocol(Readers(model, sae, tokens, config=config, **options), out_dir, mode=mode, verbose=verbose)
