"""Output folders that never clobber a user's work, and record logs that survive interruption.

Every long command (``collect``, ``train``, the protocols, ``demo``) writes into one folder. Its
policy lives here, once:

- ``mode="new"`` (the default) refuses a folder that already holds files, and says how to
  continue it (``--resume``) or replace it (``--overwrite``);
- ``mode="resume"`` requires the folder to exist (a run to continue);
- ``mode="overwrite"`` empties the folder first, so no file of the earlier run is mixed in.

A `RecordLog` is an append-only JSON-lines file of records grouped in *units* (a sequence, a
batch of firings, a cell of a sweep): each unit is appended and flushed to disk whole, so after
Ctrl-C, SIGTERM or a crash the log holds every finished unit, a resumed run skips them, and a
unit torn by the interruption is dropped and redone.

Example:
    >>> import tempfile
    >>> from writesae.outputs import RecordLog, prepare_output_dir
    >>> out = prepare_output_dir(tempfile.mkdtemp() + "/run")
    >>> log = RecordLog(out / "records.jsonl")
    >>> log.append("seq-0", [{"kl": 0.1}, {"kl": 0.2}])
    >>> log.done_units(), len(log.records())
    ({'seq-0'}, 2)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

__all__ = ["OutputMode", "OUTPUT_MODES", "OutputExistsError", "holds_files", "prepare_output_dir", "RecordLog", "jsonable"]

OutputMode = Literal["new", "resume", "overwrite"]
OUTPUT_MODES: tuple[str, ...] = ("new", "resume", "overwrite")

_UNIT_KEY = "_unit"
_EMPTY_KEY = "_empty_unit"


def jsonable(value: Any) -> Any:
    """Plain JSON values from numbers, tensors, numpy scalars, dataclasses and containers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(vars(value))
    return value


class OutputExistsError(FileExistsError):
    """The output folder already holds a run, and neither resume nor overwrite was asked for."""


def _visible_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def holds_files(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding files (hidden ones aside): a run that `prepare_output_dir`
    refuses in ``"new"`` mode and can continue in ``"resume"`` mode."""
    path = Path(path)
    return path.is_dir() and bool(_visible_entries(path))


def prepare_output_dir(path: str | os.PathLike, mode: str = "new", what: str = "run") -> Path:
    """Make ``path`` ready for a command's outputs under the no-clobber policy.

    Args:
        path: The output folder.
        mode: ``"new"``: create it, refusing a folder that already holds files; ``"resume"``: it
            must exist (the run to continue); ``"overwrite"``: remove whatever it holds first.
        what: What the folder holds, for error messages (``"run"``, ``"store"``, ``"SAE"``).

    Returns:
        ``path`` as a ``Path`` (existing afterwards).

    Raises:
        OutputExistsError: ``mode="new"`` and the folder holds files.
        FileNotFoundError: ``mode="resume"`` and there is nothing to resume.
        ValueError: an unknown mode, or ``path`` is a file.
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(OUTPUT_MODES)}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file; choose a folder path for --out")
    existing = _visible_entries(path) if path.is_dir() else []
    if mode == "new" and existing:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise OutputExistsError(
            f"{path} already holds a {what} ({shown}). Pass --resume to continue it, --overwrite to "
            f"replace it, or choose another output folder."
        )
    if mode == "resume" and not existing:
        raise FileNotFoundError(
            f"nothing to resume in {path}: the folder is missing or empty. Drop --resume to start a new {what}."
        )
    if mode == "overwrite" and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RecordLog:
    """An append-only JSON-lines file of records, written and resumed one unit at a time.

    Each record line carries its unit's key under ``"_unit"``; the last line of a unit carries
    ``"_unit_done": true``. Reading keeps only records of completed units, so a unit torn by an
    interruption is invisible (and `append` of a later unit truncates its remains first).

    Args:
        path: The JSON-lines file (created on the first append).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._repaired = False

    def _read(self) -> tuple[list[dict[str, Any]], int]:
        """Completed records, and the byte length of the file up to the last completed unit."""
        if not self.path.exists():
            return [], 0
        records: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        good_bytes = offset = 0
        with open(self.path, "rb") as f:
            for raw in f:
                offset += len(raw)
                try:
                    record = json.loads(raw)
                except ValueError:  # a torn last line
                    break
                if not raw.endswith(b"\n"):
                    break
                pending.append(record)
                if record.pop("_unit_done", False):
                    records += pending
                    pending = []
                    good_bytes = offset
        return records, good_bytes

    def records(self) -> list[dict[str, Any]]:
        """Every record of every completed unit, in order (without the bookkeeping keys)."""
        return [{k: v for k, v in r.items() if k != _UNIT_KEY} for r in self._read()[0] if _EMPTY_KEY not in r]

    def done_units(self) -> set[str]:
        """Keys of the completed units (a resumed run skips these)."""
        return {r[_UNIT_KEY] for r in self._read()[0]}

    def append(self, unit: str, records: Iterable[dict[str, Any]]) -> None:
        """Append one unit's records and flush them to disk.

        Args:
            unit: The unit's key (unique in the log, e.g. ``"seq-12"``).
            records: JSON-serialisable dicts (may be empty: the unit is still marked done).
        """
        if not self._repaired:  # drop a torn tail left by an interrupted run, once
            _, good = self._read()
            if self.path.exists() and self.path.stat().st_size != good:
                with open(self.path, "r+b") as f:
                    f.truncate(good)
            self._repaired = True
        lines = [dict(jsonable(r), **{_UNIT_KEY: unit}) for r in records] or [{_UNIT_KEY: unit, _EMPTY_KEY: True}]
        lines[-1]["_unit_done"] = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
