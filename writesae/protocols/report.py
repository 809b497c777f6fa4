"""The files of a run directory (docs/design.md §7.2), written atomically.

::

    run/
      settings.json    what the run did (protocol, config, model, cell): a resume must match it
      records.jsonl    one typed record per line (written unit by unit by `writesae.outputs.RecordLog`)
      summary.json     the headline numbers and the alternatives
      report.md        the same, for a person, with the plots
      atoms.jsonl      per-atom rows (one JSON object per line), when the protocol has them
      *.png            plots

Every file goes through `hooked_recurrent.files`: an interrupted run never leaves a half file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from hooked_recurrent.files import atomic_write, atomic_write_text
from writesae.outputs import jsonable

__all__ = ["RunDir", "markdown_table", "config_table", "plt_module"]


class RunDir:
    """The files of one protocol run.

    Args:
        path: The run directory (created if missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: Any) -> Path:
        """``name`` (e.g. ``summary.json``) holding ``data`` as indented JSON."""
        path = self.path / name
        atomic_write_text(path, json.dumps(jsonable(data), indent=2) + "\n")
        return path

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def write_table(self, name: str, rows: list[Any]) -> Path:
        """``{name}.jsonl``: one JSON object per row (dataclasses or dicts)."""
        path = self.path / f"{name}.jsonl"
        lines = [json.dumps(jsonable(asdict(r) if is_dataclass(r) else r)) + "\n" for r in rows]
        atomic_write_text(path, "".join(lines))
        return path

    def read_table(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.path / f"{name}.jsonl").read_text().splitlines() if line]

    def write_report(self, title: str, sections: list[tuple[str, str]], plots: list[str] = ()) -> Path:
        """``report.md``: a title, ``(heading, markdown)`` sections, then the plots."""
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


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A small markdown table (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def config_table(config: Any) -> str:
    """A protocol config (a dataclass) as a one-row markdown table, for the report's settings section."""
    values = asdict(config)
    return markdown_table([{k: str(v) for k, v in values.items()}], list(values))


def plt_module() -> Any:
    """matplotlib.pyplot; with a non-interactive backend unless pyplot is already in use.

    Headless runs (CI, servers, the command line) get Agg; a notebook or an interactive session
    that already imported pyplot keeps its backend, so its own plots still show.
    """
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
