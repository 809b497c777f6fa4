"""Run directories: per-record JSONL, a summary JSON, a short markdown report, and plots.

Every protocol writes the same layout, so results can be compared and reloaded::

    run/
      records.jsonl    one line per firing / trial / (atom, eps, prompt) measurement
      summary.json     the headline numbers and the settings that produced them
      report.md        the same, for a person, with the plots
      *.png            plots

Files are written atomically (write, then rename): an interrupted run never leaves a half file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hooked_recurrent.files import atomic_write, atomic_write_text
from writesae.outputs import jsonable

__all__ = ["RunDir", "jsonable"]


class RunDir:
    """A protocol's output directory.

    Args:
        path: Directory (created; files of an earlier run with the same names are replaced).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_records(self, records: Iterable[dict[str, Any]], name: str = "records.jsonl") -> Path:
        path = self.path / name
        atomic_write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in records))
        return path

    def write_summary(self, summary: dict[str, Any], name: str = "summary.json") -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(jsonable(summary), indent=2) + "\n")
        return path

    def write_report(self, title: str, sections: list[tuple[str, str]], plots: list[str] = ()) -> Path:
        lines = [f"# {title}", ""]
        for heading, body in sections:
            lines += [f"## {heading}", "", body.rstrip(), ""]
        for plot in plots:
            lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
        path = self.path / "report.md"
        atomic_write_text(path, "\n".join(lines))
        return path

    def save_figure(self, figure: Any, name: str) -> str:
        """Save a matplotlib figure as PNG (atomically) and close it; returns the file name."""
        import matplotlib.pyplot as plt

        try:
            atomic_write(self.path / name, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        finally:
            plt.close(figure)
        return name


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run directory (or of a records file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A small markdown table."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def plt_module() -> Any:
    """matplotlib.pyplot with a non-interactive backend (runs headless, in CI and on servers)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
