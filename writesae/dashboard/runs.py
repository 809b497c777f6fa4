"""Per-atom figures from protocol run directories (substitution test, logit shift).

A run directory (docs/design.md §7.2) is read with `writesae.protocols.run.load_run`: its
``settings.json`` names the protocol, its ``atoms.jsonl`` holds the per-atom rows. Per atom the
dashboard shows:

- substitution: the firings tested (``n``), the atom's wins and win rate over deletion and the
  strict chain rate (atom < delete < random), in the run's headline variant, and the atom's
  register/bundle class in the run (the run classifies every alive atom; untested ones are not shown);
- logit shift: the median over eps of R^2 with no fitted parameter, of the paper's formula and of
  the exact first-order shift.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from writesae.protocols.run import load_run

__all__ = ["atom_run_figures"]


def _substitution(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {
        int(row["atom"]): {
            "n": row["n_tested"],
            "wins": row["n_wins"],
            "win_rate": row["win_rate"],
            "strict_chain_rate": row["strict_chain_rate"],
            "class": row["atom_class"],
        }
        for row in rows
        if row["n_tested"]
    }


def _logit_shift(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    cells: dict[int, list[dict[str, Any]]] = {}
    for cell in rows:
        cells.setdefault(int(cell["atom"]), []).append(cell)

    def median(cells: list[dict[str, Any]], path: str) -> float | None:
        values = [c["r2"][path] for c in cells if c["r2"][path] is not None and np.isfinite(c["r2"][path])]
        return float(np.median(values)) if values else None

    return {
        atom: {"r2_paper": median(rows, "out_proj"), "r2_exact": median(rows, "exact"), "eps": [c["eps"] for c in rows]}
        for atom, rows in cells.items()
    }


def atom_run_figures(run_dirs: Sequence[str | os.PathLike]) -> dict[int, dict[str, Any]]:
    """``atom -> {"substitution": {...}, "logit_shift": {...}}`` from the given run directories.

    Args:
        run_dirs: Directories written by `writesae.protocols` (substitution or logit shift).

    Raises:
        FileNotFoundError: A directory that is no protocol run.
        ValueError: A run of another protocol.
    """
    readers = {"substitution": _substitution, "logit-shift": _logit_shift}
    figures: dict[int, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run = load_run(run_dir)
        protocol = run.settings.get("protocol")
        if protocol not in readers:
            raise ValueError(f"{run_dir} is a {protocol!r} run; pass substitution or logit-shift run directories")
        for atom, values in readers[protocol](run.tables.get("atoms", [])).items():
            figures.setdefault(atom, {})[protocol.replace("-", "_")] = values
    return figures
