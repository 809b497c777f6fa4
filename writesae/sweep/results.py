"""A sweep's results: one table (CSV, JSON lines, markdown), the best cells, and plots.

Columns: the cell's id, ``layer``, ``head``, the grid's other keys, ``seed``/``d_sae``/``k``/
``variant``/``input_scaling`` when not in the grid, then the validation metrics of the SAE kept
(the one with the best validation MSE): ``val_mse``, ``val_nmse``, ``val_explained_variance``,
``val_dead_fraction`` (atoms that never fire on the validation split), ``val_l0``, and, when the
grid asks for it, ``win_rate`` and ``n_firings`` of the substitution test.

Plots: for every grid key with several values, each metric against that key (one dot per cell, a
line through the means); and explained variance against L0, one marker per SAE family.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hooked_recurrent.files import atomic_write_text

from writesae.protocols.report import RunDir, markdown_table, plt_module

__all__ = ["write_results", "TABLE_METRICS"]

TABLE_METRICS = ("val_mse", "val_explained_variance", "val_dead_fraction", "val_l0", "win_rate")
_LABELS = {"val_mse": "validation MSE", "val_explained_variance": "explained variance",
           "val_dead_fraction": "dead fraction", "val_l0": "L0", "win_rate": "substitution win rate"}  # fmt: skip


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return columns


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _metrics(rows: list[dict[str, Any]]) -> list[str]:
    return [m for m in TABLE_METRICS if any(r.get(m) is not None for r in rows)]


def _plot_by_key(run: RunDir, rows: list[dict[str, Any]], key: str, values: list[Any]) -> str:
    plt = plt_module()
    metrics = _metrics(rows)
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = []
        for x, value in enumerate(values):
            ys = [r[metric] for r in rows if r.get(key) == value and r.get(metric) is not None]
            ax.scatter([x] * len(ys), ys, s=14, alpha=0.6)
            means.append(sum(ys) / len(ys) if ys else float("nan"))
        ax.plot(range(len(values)), means, color="black", linewidth=1)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_title(_LABELS[metric], fontsize=9)
    figure.tight_layout()
    return run.save_figure(figure, f"by_{key}.png")


def _plot_ev_vs_l0(run: RunDir, rows: list[dict[str, Any]]) -> str:
    plt = plt_module()
    figure, ax = plt.subplots(figsize=(4.2, 3.2))
    for family in sorted({str(r.get("variant")) for r in rows}):
        mine = [r for r in rows if str(r.get("variant")) == family]
        ax.scatter([r["val_l0"] for r in mine], [r["val_explained_variance"] for r in mine], label=family, s=18)
    ax.set_xlabel("L0 (validation)")
    ax.set_ylabel("explained variance (validation)")
    ax.legend(title="family", fontsize=8)
    figure.tight_layout()
    return run.save_figure(figure, "explained_variance_vs_l0.png")


def write_results(out: str | Path, grid: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the table, summary, report and plots of a finished sweep into ``out``; returns ``rows``.

    Args:
        out: The sweep's folder.
        grid: Its `writesae.sweep.SweepGrid` (which keys vary).
        rows: One row per cell, in grid order (settings then metrics).
    """
    run = RunDir(out)
    columns = _columns(rows)
    atomic_write_text(run.path / "results.csv", _csv(rows, columns))
    run.write_table("results", rows)
    ranked = [r for r in rows if r.get("val_mse") is not None]
    best = {
        "lowest_val_mse": min(ranked, key=lambda r: r["val_mse"])["cell"] if ranked else None,
        "highest_explained_variance": max(ranked, key=lambda r: r["val_explained_variance"])["cell"] if ranked else None,
    }
    run.write_json("summary.json", {"n_cells": len(rows), "grid": grid.grid, "fixed": grid.fixed, "best": best, "rows": rows})
    plots = [_plot_by_key(run, rows, key, values) for key, values in grid.grid.items() if len(values) > 1]
    plots.append(_plot_ev_vs_l0(run, rows))
    shown = [c for c in columns if c not in ("seconds", "resumed", "val_nmse", "best_val_mse", "rank", "device")]
    sections = [
        ("Results", markdown_table(rows, shown)),
        ("Best cells", f"lowest validation MSE: `{best['lowest_val_mse']}`; highest explained variance: "
                       f"`{best['highest_explained_variance']}`"),
    ]  # fmt: skip
    run.write_report(f"Sweep of {len(rows)} cells on {grid.store}", sections, plots)
    return rows
