"""Per-atom figures from protocol run directories (substitution test, closed-form logit shift).

A run directory is recognised by its ``summary.json``: a substitution run has ``n_firings`` and its
``records.jsonl`` one record per firing; a logit-shift run has ``cells`` (one per atom and eps).
Per atom the dashboard shows:

- substitution: the firings tested (``n``), the win rate of the atom over deletion, the strict
  chain rate (atom < delete < random), and the run's register/bundle class when the atom entered
  its population test;
- logit shift: the median over eps of R^2, zero-parameter and with a fitted gain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atom_run_figures"]


def _substitution(run: Path, summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    by_atom: dict[int, list[dict[str, Any]]] = {}
    for line in (run / "records.jsonl").read_text().splitlines():
        if line:
            record = json.loads(line)
            by_atom.setdefault(int(record["atom"]), []).append(record)
    population = summary.get("population", {})
    classes = {int(a): "register" for a in population.get("registers", [])}
    classes.update({int(a): "bundle" for a in population.get("bundles", [])})
    return {
        atom: {
            "n": len(records),
            "wins": int(sum(r["win"] for r in records)),
            "win_rate": float(np.mean([r["win"] for r in records])),
            "strict_chain_rate": float(np.mean([r["strict_chain"] for r in records])),
            "class": classes.get(atom),
        }
        for atom, records in by_atom.items()
    }


def _logit_shift(summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    cells: dict[int, list[dict[str, Any]]] = {}
    for cell in summary["cells"]:
        cells.setdefault(int(cell["atom"]), []).append(cell)

    def median(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None and np.isfinite(r[key])]
        return float(np.median(values)) if values else None

    return {
        atom: {
            "r2_zero_parameter": median(rows, "r2_zero_parameter"),
            "r2_fitted_gain": median(rows, "r2_fitted_gain"),
            "eps": [r["eps"] for r in rows],
        }
        for atom, rows in cells.items()
    }


def atom_run_figures(run_dirs: Sequence[str | os.PathLike]) -> dict[int, dict[str, Any]]:
    """``atom -> {"substitution": {...}, "logit_shift": {...}}`` from the given run directories.

    Args:
        run_dirs: Directories written by `writesae.protocols` (substitution or logit shift).

    Raises:
        ValueError: A directory that is neither.
    """
    figures: dict[int, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run = Path(run_dir)
        summary_path = run / "summary.json"
        if not summary_path.exists():
            raise FileNotFoundError(f"{run} has no summary.json: pass a run directory of `writesae substitution` or `writesae logit-shift`")
        summary = json.loads(summary_path.read_text())
        if "n_firings" in summary:
            kind, per_atom = "substitution", _substitution(run, summary) if summary["n_firings"] else {}
        elif "cells" in summary:
            kind, per_atom = "logit_shift", _logit_shift(summary)
        else:
            raise ValueError(f"{run} is neither a substitution nor a logit-shift run (its summary.json has no n_firings or cells)")
        for atom, values in per_atom.items():
            figures.setdefault(atom, {})[kind] = values
    return figures
