"""The logit shift of an atom written into the state (paper §4): the closed form, and what is exact.

Add ``eps * A_i`` (atom ``i``: key factor ``v_i``, value factor ``w_i``) to a head's cached state
after position ``t0`` has been read (a cache edit: only later positions see it) and read the logit
of the unedited run's top-1 token at ``t = t0 + h``. The paper predicts it by dropping the delta
rule's erase terms and every path but the head's own output projection (its Eq. 4)::

    dlogit_tok(t) ~ eps * prod_{s=t0+1..t} alpha_s * <v_i, q_t> * <W_O[h] w_i, W_U[tok]>

Each prediction below is computed for every measurement, a ladder from that formula to the exact
first-order shift (`hooked_recurrent.linear_response`, forward-mode AD through the hooked model):

============== =========================================== ===========================================
path           state propagation from t0 to t              readout of the head's change at t
============== =========================================== ===========================================
out_proj       gate product only (paper)                   the head's out_proj columns, then W_U
local          gate product only                           exact derivative of the logit at t w.r.t. o_t
erase          exact (decay and erase of the head)         out_proj columns, then W_U
same_position  exact                                       exact derivative at t (no other position)
exact          exact, and every read s <= t, through later layers and attention
============== =========================================== ===========================================

R^2 is computed per (atom, eps) cell over prompts, positions and horizons, with **zero fitted
parameters**. Two fitted numbers are reported beside it, under honest names: ``r2_cell_scale`` (one
least-squares scalar per cell and path: is the prediction right up to a constant?), and
``r2_triple_fit``, the paper's "empirical G" (App. A): one scalar per (prompt, atom, eval token)
triple fitted across the eps grid. Every path predicts a shift proportional to eps for a triple, so
that fit measures only how linear the measured shift is in eps, not the formula; it is reported as
a linearity check. ``linearity`` gives the exact path's R^2 per eps: where first order ends.

Each prompt is walked once (`writesae.protocols.walk`); its reference positions are visited in
order, and only the edited conditions fork.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_recurrent.linear_response import LOGITS, cache_responses, linear_responses

from .activity import scan_activity
from .cell import sae_cell, trace_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, unit_generator
from .walk import SequenceWalk

__all__ = ["LogitShiftConfig", "LogitShiftRecord", "LogitShiftCell", "LogitShift", "run_logit_shift", "r_squared",
           "PATHS"]  # fmt: skip

PATHS: dict[str, str] = {
    "out_proj": "paper Eq. 4: gate product, query, the head's out_proj columns and W_U",
    "local": "gate product; exact readout at t (gated norm, later layers at t, final norm)",
    "erase": "exact propagation in the head (decay and erase); out_proj readout",
    "same_position": "exact propagation; exact readout at t, no other position",
    "exact": "exact first order: every read s <= t, later layers, attention (forward-mode AD)",
}
"""The ladder of predictions, from the paper's formula to the exact first-order shift."""


@dataclass
class LogitShiftConfig:
    """Choices of the logit-shift audit (docs/design.md §5).

    Attributes:
        epsilons: Perturbation sizes (paper App. A: 0.1, 0.3, 1, 3; Table 9 lists 0.25..1).
        eps_scale: ``"absolute"`` (the paper's unit atoms) or ``"state_norm"``: each eps times the
            median Frobenius norm of the cell's state over the prompts, so the grid is a small
            perturbation for models whose states are small.
        horizons: Offsets ``t - t0`` at which the shift is read.
        positions_per_prompt: Reference positions ``t0`` drawn per prompt.
        n_atoms: With no atoms given, the atoms that fire most often on the prompts.
        seed: Seed of the position draw.
    """

    epsilons: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    eps_scale: Literal["absolute", "state_norm"] = "absolute"
    horizons: tuple[int, ...] = (1, 2, 4, 8)
    positions_per_prompt: int = 1
    n_atoms: int = 8
    seed: int = 2026

    def __post_init__(self) -> None:
        check_config(self, positive=("epsilons", "horizons", "positions_per_prompt", "n_atoms"),
                     nonempty=("epsilons", "horizons"))  # fmt: skip


@dataclass
class LogitShiftRecord:
    """One measured shift and its predictions.

    Attributes:
        prompt: Prompt index.
        t0: Position after which the state is edited.
        t: Position read (``t0 + horizon``).
        horizon: ``t - t0``.
        atom: Atom written.
        eps: Its size (in the config's units).
        token: The unedited run's top-1 token at ``t``.
        gate_product: ``prod_{s=t0+1..t} alpha_s``.
        measured: Logit change of ``token`` at ``t`` after the real cache edit.
        predicted: Prediction of each path in `PATHS`.
    """

    prompt: int
    t0: int
    t: int
    horizon: int
    atom: int
    eps: float
    token: int
    gate_product: float
    measured: float
    predicted: dict[str, float]


@dataclass
class LogitShiftCell:
    """One (atom, eps) cell (row of ``atoms.jsonl``).

    Attributes:
        atom: Atom index.
        eps: Perturbation size.
        n: Measurements.
        r2: Zero-parameter R^2 of each path.
        r2_cell_scale: R^2 of each path with one fitted scalar for the cell.
        sign_agreement: Fraction of measurements whose sign each path predicts.
        r2_triple_fit: R^2 with one scalar per (prompt, t0, t) triple across eps (the paper's
            "empirical G"; a linearity check).
    """

    atom: int
    eps: float
    n: int
    r2: dict[str, float]
    r2_cell_scale: dict[str, float]
    sign_agreement: dict[str, float]
    r2_triple_fit: float


def r_squared(measured: np.ndarray, predicted: np.ndarray) -> float:
    """``1 - SS_res / SS_tot`` of a prediction taken as is (NaN when the measurements are constant).

    >>> r_squared(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    0.5
    """
    ss_tot = float(((measured - measured.mean()) ** 2).sum())
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(((measured - predicted) ** 2).sum()) / ss_tot


def _scaled(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The prediction times its least-squares scalar."""
    denominator = float((predicted**2).sum())
    return predicted * (float((measured * predicted).sum()) / denominator if denominator > 0 else 0.0)


class LogitShift(Protocol[LogitShiftRecord]):
    """The logit-shift audit as a protocol (run it with `run_protocol`, or `run_logit_shift`).

    Args:
        model: The hooked model.
        sae: The per-head WriteSAE whose atoms are written (its cell is where they go).
        tokens: Prompts (one row each).
        atoms: Atoms to write (default: the ``n_atoms`` most frequent on the prompts).
        attention_mask: Padding mask of the prompts.
        config: Protocol choices.
    """

    name, title, record_type = "logit-shift", "Logit shift of atoms written into the state", LogitShiftRecord

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        atoms: list[int] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        config: LogitShiftConfig | None = None,
    ) -> None:
        self.model, self.sae, self.tokens, self.attention_mask = model, sae, tokens, attention_mask
        self.config = config = config or LogitShiftConfig()
        if not config.horizons or min(config.horizons) < 1:
            raise ValueError(f"horizons must be >= 1 (got {config.horizons}): the edit is read after t0")
        self.cell, kind = sae_cell(model, sae)
        self.unit = 1.0
        if config.eps_scale == "state_norm":
            trace = trace_cell(model, tokens, self.cell, attention_mask=attention_mask, with_states=True)
            norms = trace.states.flatten(2).norm(dim=-1)
            self.unit = float(norms[attention_mask.bool().cpu()].median() if attention_mask is not None else norms.median())
        if atoms is None:
            activity = scan_activity(model, sae, tokens, self.cell, kind, attention_mask=attention_mask)
            atoms = activity.frequent_atoms(config.n_atoms)
        self.atoms = list(atoms)
        with torch.no_grad():
            self.deltas = torch.stack([self.unit * sae.atom_matrices(torch.tensor([a]))[0].detach().float().cpu() for a in self.atoms])
            self.out_proj = model.mixer(self.cell.layer).head_output_weight(self.cell.head).detach().float().cpu()
            self.unembed = model.W_U.detach().float().cpu()

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head, "hook": self.sae.cfg.metadata.hook_name},
            "atoms": self.atoms,
            "eps_unit": self.unit,
            "tokens": {"shape": list(self.tokens.shape), "sha1": hashlib.sha1(self.tokens.cpu().numpy().tobytes()).hexdigest()},
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[LogitShiftRecord]]]]:
        for b in range(self.tokens.shape[0]):
            yield f"prompt-{b}", lambda b=b: self._prompt(b)

    # ------------------------------------------------------------------ one prompt

    def _prompt(self, b: int) -> list[LogitShiftRecord]:
        config, horizon = self.config, max(self.config.horizons)
        tokens = self.tokens[b : b + 1]
        mask = None if self.attention_mask is None else self.attention_mask[b : b + 1]
        start = 0 if mask is None else int((mask[0] == 0).sum())  # left padding
        end = tokens.shape[1] - horizon - 1
        if end <= start + 1:
            return []
        generator = unit_generator(config.seed, f"prompt-{b}")
        t0s = sorted(torch.randint(start + 1, end, (config.positions_per_prompt,), generator=generator).tolist())
        trace = trace_cell(self.model, tokens, self.cell, attention_mask=mask)
        walk = SequenceWalk(self.model, tokens, mask)
        records = []
        for t0 in t0s:
            records += self._reference_position(b, t0, tokens, mask, trace, walk.cache_at(t0 + 1))
        return records

    def _reference_position(self, b: int, t0: int, tokens: Tensor, mask: Tensor | None, trace: Any, cache: Any) -> list[LogitShiftRecord]:
        config, horizon, cell = self.config, max(self.config.horizons), self.cell
        rest = tokens[:, t0 + 1 : t0 + 1 + horizon]
        rest_mask = None if mask is None else mask[:, t0 + 1 : t0 + 1 + horizon]
        epsilons = list(config.epsilons)
        measured = self._measure(cache, rest, rest_mask, epsilons)  # [1 + atoms*eps, H, V]
        base = measured[0]
        tokens_at = [int(base[h - 1].argmax()) for h in config.horizons]
        read_name = cell.hook_name(self.model, "hook_recurrence_out")
        jvp = cache_responses(self.model, cache, rest, cell.layer, self.deltas, head=cell.head, attention_mask=rest_mask,
                              reads=[read_name])  # fmt: skip
        logit_response = jvp[LOGITS][:, 0].float().cpu()  # [atoms, H, V]
        read_response = jvp[read_name][:, 0, :, cell.head].float().cpu()  # [atoms, H, d_v]
        records = []
        for j, h in enumerate(config.horizons):
            t, token = t0 + h, tokens_at[j]
            gate = float(trace.log_decay[0, t0 + 1 : t + 1].sum().exp())
            gated_reads = gate * (trace.query[0, t].float() @ self.deltas)  # [atoms, d_v]: the read without the erase
            exact_reads = read_response[:, h - 1]  # [atoms, d_v]: the head's exact read change
            out_readout = self.out_proj.T @ self.unembed[:, token]  # [d_v]
            local_readout = self._readout_at(cache, rest[:, :h], rest_mask, token, torch.cat([gated_reads, exact_reads]))
            for i, atom in enumerate(self.atoms):
                unit_predictions = {  # per unit of eps
                    "out_proj": float(gated_reads[i] @ out_readout),
                    "local": float(local_readout[i]),
                    "erase": float(exact_reads[i] @ out_readout),
                    "same_position": float(local_readout[len(self.atoms) + i]),
                    "exact": float(logit_response[i, h - 1, token]),
                }
                for e, eps in enumerate(epsilons):
                    row = 1 + i * len(epsilons) + e
                    records.append(LogitShiftRecord(
                        prompt=b, t0=t0, t=t, horizon=h, atom=atom, eps=eps, token=token, gate_product=gate,
                        measured=float(measured[row, h - 1, token] - base[h - 1, token]),
                        predicted={p: eps * v for p, v in unit_predictions.items()},
                    ))  # fmt: skip
        return records

    @torch.no_grad()
    def _measure(self, cache: Any, rest: Tensor, rest_mask: Tensor | None, epsilons: list[float]) -> Tensor:
        """Logits over ``rest``: row 0 unedited, then one row per (atom, eps) with the real cache edit."""
        deltas = [eps * d for d in self.deltas for eps in epsilons]
        tiled = cache.repeat(len(deltas) + 1)
        state = tiled.state(self.cell.layer)  # a view, key-by-value
        for i, delta in enumerate(deltas):
            state[i + 1, self.cell.head] += delta.to(state)
        mask = None if rest_mask is None else rest_mask.repeat(len(deltas) + 1, 1)
        return self.model(rest.repeat(len(deltas) + 1, 1), attention_mask=mask, cache=tiled).float().cpu()

    def _readout_at(self, cache: Any, rest: Tensor, rest_mask: Tensor | None, token: int, reads: Tensor) -> Tensor:
        """The first-order change of ``token``'s logit at the last position of ``rest`` when the head's
        read there (``o_t``) changes by each row of ``reads`` and nothing else does: the exact readout
        at ``t`` (gated norm, later layers at ``t``, final norm), by one forward-mode pass."""
        name, t = self.cell.hook_name(self.model, "hook_recurrence_out"), cache.position + rest.shape[1] - 1
        mask = None if rest_mask is None else rest_mask[:, : rest.shape[1]]
        response = linear_responses(self.model, rest, name, t, reads, head=self.cell.head, attention_mask=mask, cache=cache)
        return response[LOGITS][:, 0, -1, token].float().cpu()

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[LogitShiftRecord]) -> dict[str, Any]:
        cells = self._cells(records)

        def median(values: list[float]) -> float | None:
            values = [v for v in values if v is not None and np.isfinite(v)]
            return float(np.median(values)) if values else None

        ladder = [{"path": p, "label": label, "median_r2": median([c.r2[p] for c in cells]),
                   "median_r2_cell_scale": median([c.r2_cell_scale[p] for c in cells]),
                   "median_sign_agreement": median([c.sign_agreement[p] for c in cells])} for p, label in PATHS.items()]  # fmt: skip
        linearity = [{"eps": eps, "median_r2_exact": median([c.r2["exact"] for c in cells if c.eps == eps]),
                      "median_r2_triple_fit": median([c.r2_triple_fit for c in cells if c.eps == eps])}
                     for eps in self.config.epsilons]  # fmt: skip
        return {
            "n_records": len(records),
            "n_cells": len(cells),
            "eps_unit": self.unit,
            "atoms": self.atoms,
            "median_r2": {row["path"]: row["median_r2"] for row in ladder},
            "median_r2_triple_fit": median([c.r2_triple_fit for c in cells]),
            "ladder": ladder,
            "linearity": linearity,
        }

    def _cells(self, records: list[LogitShiftRecord]) -> list[LogitShiftCell]:
        groups: dict[tuple[int, float], list[LogitShiftRecord]] = {}
        for r in records:
            groups.setdefault((r.atom, r.eps), []).append(r)
        triple_fit = self._triple_fit(records)
        cells = []
        for (atom, eps), rs in sorted(groups.items()):
            measured = np.array([r.measured for r in rs])
            r2, scaled, signs = {}, {}, {}
            for path in PATHS:
                predicted = np.array([r.predicted[path] for r in rs])
                r2[path] = r_squared(measured, predicted)
                scaled[path] = r_squared(measured, _scaled(measured, predicted))
                signs[path] = float(np.mean(np.sign(measured) == np.sign(predicted)))
            fitted = np.array([triple_fit[(r.prompt, r.t0, r.t, r.atom)] * r.eps for r in rs])
            cells.append(LogitShiftCell(atom, eps, len(rs), r2, scaled, signs, r_squared(measured, fitted)))
        return cells

    @staticmethod
    def _triple_fit(records: list[LogitShiftRecord]) -> dict[tuple[int, int, int, int], float]:
        """One least-squares slope of the measured shift against eps per (prompt, t0, t, atom) triple.

        (The eval token is fixed by the triple.) Every path's prediction is proportional to eps,
        so fitting a scalar G per triple to any of them gives this same fit.
        """
        sums: dict[tuple[int, int, int, int], list[float]] = {}
        for r in records:
            s = sums.setdefault((r.prompt, r.t0, r.t, r.atom), [0.0, 0.0])
            s[0] += r.measured * r.eps
            s[1] += r.eps * r.eps
        return {key: xy / xx if xx > 0 else 0.0 for key, (xy, xx) in sums.items()}

    def tables(self, summary: dict[str, Any], records: list[LogitShiftRecord]) -> dict[str, list[Any]]:
        return {"atoms": self._cells(records)}

    def report(self, summary: dict[str, Any], records: list[LogitShiftRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config) + f"\n\neps unit: {self.unit:.4g}; atoms: {self.atoms}")]
        if not records:
            return sections + [("Headline", "No measurements (prompts shorter than the horizons).")]
        r2 = summary["median_r2"]
        sections.append((
            "Headline",
            f"{summary['n_cells']} (atom, eps) cells, {summary['n_records']} measurements. Median zero-parameter R^2: "
            f"**{_fmt(r2['exact'])}** for the exact first-order shift, **{_fmt(r2['out_proj'])}** for the paper's formula "
            f"(Eq. 4). The paper's per-triple fit (its \"empirical G\") reaches {_fmt(summary['median_r2_triple_fit'])}: it "
            "measures how linear the shift is in eps, not the formula.",
        ))  # fmt: skip
        sections.append(("The ladder from the paper's formula to the exact shift",
                         markdown_table(summary["ladder"], ["path", "label", "median_r2", "median_r2_cell_scale", "median_sign_agreement"])))  # fmt: skip
        sections.append(("Linearity: the exact path per eps", markdown_table(summary["linearity"], ["eps", "median_r2_exact", "median_r2_triple_fit"])))
        sections.append(("Cells", "Per (atom, eps) rows, every path, in `atoms.jsonl`."))
        return sections

    def plots(self, summary: dict[str, Any], records: list[LogitShiftRecord], plt: Any) -> dict[str, Any]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        measured = np.array([r.measured for r in records])
        for ax, path in zip(axes, ("out_proj", "exact")):
            predicted = np.array([r.predicted[path] for r in records])
            ax.scatter(predicted, measured, s=6, alpha=0.5)
            lim = float(max(np.abs(predicted).max(), np.abs(measured).max(), 1e-12))
            ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8)
            ax.set_xlabel(f"prediction ({path}, zero parameters)")
            ax.set_ylabel("measured logit shift")
            ax.set_title(f"{path}: median R^2 {_fmt(summary['median_r2'][path])}")
        figures = {"r2_scatter.png": fig}
        fig, ax = plt.subplots(figsize=(5, 3.5))
        rows = summary["linearity"]
        ax.plot([r["eps"] for r in rows], [r["median_r2_exact"] for r in rows], marker="o", label="exact path")
        ax.plot([r["eps"] for r in rows], [r["median_r2_triple_fit"] for r in rows], marker="o", label="per-triple fit")
        ax.set_xscale("log")
        ax.set_xlabel(f"eps (x {self.unit:.3g})")
        ax.set_ylabel("median R^2")
        ax.set_title("where first order ends")
        ax.legend()
        figures["linearity.png"] = fig
        return figures


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_logit_shift(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[LogitShiftRecord]:
    """Measure the logit shifts of atoms written into the state, and predict them along the ladder.

    Args:
        model: The hooked model.
        sae: The per-head WriteSAE whose atoms are written.
        tokens: Prompts (one row each).
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the prompts.
        **options: `LogitShift`'s keyword arguments (``atoms``, ``attention_mask``, ``config``).

    Returns:
        The records (`LogitShiftRecord`), the summary and the per-cell table (`LogitShiftCell`).
    """
    return run_protocol(LogitShift(model, sae, tokens, **options), out_dir, mode=mode, verbose=verbose)
