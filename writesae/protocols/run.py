"""One path for every protocol: units of work -> typed records -> summary -> report, plots, tables.

A protocol (docs/design.md §7) is a subclass of `Protocol` that says *what* to measure; `run_protocol`
does the rest the same way for all of them: the output-folder policy (``new`` / ``resume`` /
``overwrite``), a record log written one unit at a time (an interrupted run resumes where it
stopped and ends with the records of an uninterrupted one), then the summary, the report, the plots
and the per-atom tables, written atomically. Without an output folder everything stays in memory.

To add a protocol, write a config dataclass, a record dataclass (fields that survive JSON: numbers,
strings, bools, lists, ``dict[str, ...]``) and a subclass that fills in the five methods::

    @dataclass
    class Reading:                         # one record
        sequence: int
        logit: float

    class LastLogit(Protocol[Reading]):
        name, title, record_type = "last-logit", "Logit of the last token", Reading

        def __init__(self, model, tokens, seed=0):
            self.model, self.tokens, self.seed = model, tokens, seed

        def settings(self):                 # what a resumed run must agree with
            return {"model": self.model.cfg.model_name, "n_sequences": len(self.tokens), "seed": self.seed}

        def units(self):                    # (key, work) pairs; work() -> list of records
            for b in range(len(self.tokens)):
                yield f"seq-{b}", lambda b=b: [Reading(b, float(self.model(self.tokens[b : b + 1])[0, -1].max()))]

        def summarize(self, records):
            return {"n": len(records), "mean": sum(r.logit for r in records) / max(len(records), 1)}

        def report(self, summary, records):  # markdown sections
            return [("Headline", f"mean top logit {summary['mean']:.3f} over {summary['n']} sequences")]

    result = run_protocol(LastLogit(model, tokens), out_dir="runs/last-logit", mode="new")
    result.records, result.summary

Optional: ``plots(summary, records, plt)`` returns ``{file name: figure}``; ``tables(summary,
records)`` returns ``{table name: [dataclass rows]}`` (written as ``{name}.jsonl``; the per-atom
table is called ``atoms``). Inside a unit, draw random numbers from `unit_generator(seed, key)`
only, so a unit's records do not depend on which units ran before it in this process, and build
edits from `hooked_recurrent.edits`.
"""

from __future__ import annotations

import json
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from tqdm.auto import tqdm

from writesae.outputs import RecordLog, jsonable, prepare_output_dir

from .report import RunDir, plt_module

__all__ = ["Protocol", "ProtocolResult", "run_protocol", "load_run", "unit_generator", "token_fingerprint", "SETTINGS", "SUMMARY"]

R = TypeVar("R")

SETTINGS, SUMMARY, RECORDS = "settings.json", "summary.json", "records.jsonl"


class Protocol(ABC, Generic[R]):
    """What one experiment measures; `run_protocol` runs it (see the module docstring).

    Attributes:
        name: Short name (``"substitution"``), used in messages and progress bars.
        title: Title of ``report.md``.
        record_type: The dataclass of one record.
    """

    name: str
    title: str
    record_type: type[R]

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The config and what the run reads (model, cell, SAE): a resume must match it exactly."""

    @abstractmethod
    def units(self) -> Iterable[tuple[str, Callable[[], list[R]]]]:
        """The work, as ``(unique key, work)`` pairs; ``work()`` returns that unit's records."""

    @abstractmethod
    def summarize(self, records: list[R]) -> dict[str, Any]:
        """The numbers of the run, JSON-able."""

    @abstractmethod
    def report(self, summary: dict[str, Any], records: list[R]) -> list[tuple[str, str]]:
        """``(heading, markdown)`` sections of ``report.md``."""

    def plots(self, summary: dict[str, Any], records: list[R], plt: Any) -> dict[str, Any]:
        """``{file name: matplotlib figure}``; none by default."""
        return {}

    def tables(self, summary: dict[str, Any], records: list[R]) -> dict[str, list[Any]]:
        """``{table name: rows}`` written as ``{name}.jsonl``; none by default."""
        return {}


@dataclass
class ProtocolResult(Generic[R]):
    """What `run_protocol` returns (and wrote, when it had an output folder).

    Attributes:
        records: Every record, in unit order (typed).
        summary: The summary.
        tables: The tables.
        out_dir: The run directory, or None.
    """

    records: list[R]
    summary: dict[str, Any]
    tables: dict[str, list[Any]] = field(default_factory=dict)
    out_dir: Path | None = None


def unit_generator(seed: int, unit: str) -> torch.Generator:
    """A generator seeded by the protocol's seed and the unit's key (stable across processes)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(unit.encode())) % 2**63)


def token_fingerprint(tokens: torch.Tensor) -> dict[str, Any]:
    """The shape and SHA-1 of a token tensor, for a protocol's settings (a resume must read the same tokens)."""
    import hashlib

    return {"shape": list(tokens.shape), "sha1": hashlib.sha1(tokens.cpu().numpy().tobytes()).hexdigest()}


def run_protocol(
    protocol: Protocol[R],
    out_dir: str | os.PathLike | None = None,
    *,
    mode: str = "new",
    verbose: bool = True,
) -> ProtocolResult[R]:
    """Run a protocol's units and write its run directory.

    Args:
        protocol: What to measure.
        out_dir: The run directory; None keeps everything in memory.
        mode: ``"new"`` (refuse a folder holding files), ``"resume"`` (skip the units the folder's
            record log has finished; its settings must match), ``"overwrite"`` (start afresh).
        verbose: Show a progress bar over the units.

    Returns:
        The records, summary and tables.

    Raises:
        OutputExistsError: ``mode="new"`` and ``out_dir`` holds files.
        ValueError: ``mode="resume"`` with different settings.
    """
    settings = jsonable(protocol.settings())
    run = log = None
    done: set[str] = set()
    if out_dir is not None:
        run = RunDir(prepare_output_dir(out_dir, mode, what=f"{protocol.name} run"))
        if mode == "resume" and (run.path / SETTINGS).exists():
            _check_settings(run.read_json(SETTINGS), settings, run.path)
        run.write_json(SETTINGS, settings)
        log = RecordLog(run.path / RECORDS)
        done = log.done_units()
    kept: list[dict[str, Any]] = []
    units = list(protocol.units())
    for key, work in tqdm(units, disable=not verbose, desc=protocol.name):
        if key in done:
            continue
        rows = [asdict(r) for r in work()]
        if log is not None:
            log.append(key, rows)
        else:
            kept += rows
    raw = log.records() if log is not None else kept
    # The same JSON round trip with or without a folder: the records are identical either way.
    records = [protocol.record_type(**json.loads(json.dumps(jsonable(r)))) for r in raw]
    summary = protocol.summarize(records)
    tables = protocol.tables(summary, records)
    if run is not None:
        run.write_json(SUMMARY, summary)
        for name, rows in tables.items():
            run.write_table(name, rows)
        figures = protocol.plots(summary, records, plt_module()) if records else {}
        plots = [run.save_figure(figure, name) for name, figure in figures.items()]
        run.write_report(protocol.title, protocol.report(summary, records), plots)
    return ProtocolResult(records, summary, tables, None if run is None else run.path)


def _check_settings(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    if saved == current:
        return
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    shown = "; ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys[:4])
    raise ValueError(
        f"cannot resume {path}: it was run with other settings ({shown}). Resume with the same settings, "
        "or pass --overwrite (mode='overwrite') to start it again."
    )


@dataclass
class LoadedRun:
    """A run directory read back (see `load_run`).

    Attributes:
        path: The directory.
        settings: ``settings.json``.
        summary: ``summary.json`` (None while the run has not finished).
        records: The records of the finished units (plain dicts).
        tables: ``{name: rows}`` for every ``*.jsonl`` table besides the records.
    """

    path: Path
    settings: dict[str, Any]
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    tables: dict[str, list[dict[str, Any]]]


def load_run(path: str | os.PathLike) -> LoadedRun:
    """Read a protocol's run directory (for dashboards, notebooks and comparisons).

    Raises:
        FileNotFoundError: ``path`` holds no ``settings.json`` (not a run directory).
    """
    run = RunDir(path) if Path(path).is_dir() else None
    if run is None or not (run.path / SETTINGS).exists():
        raise FileNotFoundError(f"{path} is not a protocol run directory (no {SETTINGS}); pass the folder given to --out")
    tables = {p.stem: run.read_table(p.stem) for p in sorted(run.path.glob("*.jsonl")) if p.name != RECORDS}
    summary = run.read_json(SUMMARY) if (run.path / SUMMARY).exists() else None
    return LoadedRun(run.path, run.read_json(SETTINGS), summary, RecordLog(run.path / RECORDS).records(), tables)
