"""``writesae demo --full``: the demo, then every paper protocol of `FULL_PROTOCOLS`, on each shipped model.

Layout of the output folder::

    OUT/
      report.md              every protocol's figures per model, next to the paper's (reference) values
      summary.json           the same numbers; per stage its status, headline, seconds and run folder
      qwen3.5/               the regular demo of stdlib:qwen3.5 (its report.md, summary.json, SAEs, runs)
        paper/<protocol>/    one run directory per paper protocol
        paper/summary.json   this model's rows of OUT/summary.json
      mamba2/                the same for stdlib:mamba2

Stages run one after the other and each keeps its own folder, so ``mode="resume"`` continues an
interrupted run stage by stage: a finished demo is kept as it is, an unfinished one continues from
its checkpoints, and each protocol continues from its record log. A protocol that does not apply to
a model is listed in the report with the reason; one that fails is listed with its error (and its
traceback printed), the other stages still run, and the run ends with an error naming the failures.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from hooked_recurrent.files import atomic_write_text
from writesae.outputs import OutputMode, holds_files, jsonable, prepare_output_dir

from .context import DemoContext
from .registry import FULL_PROTOCOLS, FullProtocol
from .report import full_report

__all__ = ["SHIPPED_MODELS", "TINY_DEMO_SIZES", "FullDemoError", "model_folder", "run_full_demo"]

SHIPPED_MODELS = ("stdlib:qwen3.5", "stdlib:mamba2")

TINY_DEMO_SIZES = {
    "store_sequences": 24, "seq_len": 48, "d_sae": 64, "k": 4, "epochs": 2, "substitution_sequences": 4,
    "substitution_atoms": 4, "firings_per_atom": 2, "shift_prompts": 2, "shift_atoms": 2, "shift_positions": 1,
    "install_prompts": 1, "new_tokens": 2,
}  # fmt: skip
"""The demo's sizes in the quick check (``preset="tiny"``): every stage runs, on a few sequences."""


class FullDemoError(RuntimeError):
    """Some protocol stages failed (the report lists them with their errors)."""


def model_folder(model_name: str) -> str:
    """``stdlib:qwen3.5`` -> ``qwen3.5``; a hub id ``org/name`` -> ``org--name``."""
    return model_name.removeprefix("stdlib:").replace("/", "--").replace(":", "-")


def _stage_mode(path: Path, mode: OutputMode) -> OutputMode:
    return "resume" if mode == "resume" and holds_files(path) else "new"


def _log(message: str, start: float) -> None:
    print(f"[{time.time() - start:6.1f} s] {message}", flush=True)


def run_full_demo(
    models: tuple[str, ...] | list[str] = SHIPPED_MODELS,
    out_dir: str | Path = "runs/demo-full",
    preset: str = "full",
    demo_sizes: dict[str, int] | None = None,
    protocols: tuple[FullProtocol, ...] = FULL_PROTOCOLS,
    jobs: int | None = None,
    layer: int | None = None,
    head: int | None = None,
    seed: int = 0,
    threads: int | None = 1,
    mode: OutputMode = "new",
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the demo and every paper protocol on each model; write the combined report.

    Args:
        models: The models, one folder each (default: both shipped models).
        out_dir: The output folder (layout in the module docstring).
        preset: ``"full"`` (the sizes of ``writesae demo --full``) or ``"tiny"`` (a quick check of
            every stage: `TINY_DEMO_SIZES` and each protocol's ``tiny`` sizes).
        demo_sizes: Overrides of the demo's sizes (on top of the preset's).
        protocols: The registry (default: `FULL_PROTOCOLS`).
        jobs: Models run at once, each in a process of its own with ``threads`` threads (default: one
            per CPU, at most one per model; one off the CPU); a registry other than `FULL_PROTOCOLS`
            runs in this process.
        layer: The cell's layer (with ``head``; one model only); default: each model's head with the
            longest memory.
        head: The cell's head.
        seed: Seed of the demo (data draws, training).
        threads: Torch threads (1 by default, as the demo); None keeps torch's setting.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see the module docstring).
        device: Where the models, tokens and SAEs go.

    Returns:
        The combined summary (also in ``OUT/summary.json``).

    Raises:
        FullDemoError: A protocol stage failed (after every other stage ran and the report was written).
    """
    from writesae.demo import DEMO_SIZES

    if preset not in ("full", "tiny"):
        raise ValueError(f"preset must be 'full' or 'tiny', not {preset!r}")
    if (layer is not None or head is not None) and len(models) != 1:
        raise ValueError(
            "a layer and head pick one model's cell: give one model (--model), or leave them out and each "
            "model's head with the longest memory is used"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    sizes = {**DEMO_SIZES, **(TINY_DEMO_SIZES if preset == "tiny" else {}), **(demo_sizes or {})}
    start = time.time()
    out = prepare_output_dir(out_dir, mode, what="full demo run")
    combined: dict[str, Any] = {
        "preset": preset, "demo_sizes": sizes, "protocols": [p.name for p in protocols], "models": {},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": list(os.getloadavg())},
    }  # fmt: skip
    if protocols is not FULL_PROTOCOLS or (jobs is None and device != "cpu"):
        jobs = 1  # a custom registry may not pickle; one accelerator is best shared by taking turns
    jobs = min(len(models), jobs or os.cpu_count() or 1)
    combined["machine"]["processes"] = jobs
    settings = {"sizes": sizes, "preset": preset, "cell": (layer, head), "seed": seed, "threads": threads, "mode": mode,
                "device": device, "start": start}  # fmt: skip
    broken: list[str] = []
    if jobs == 1:
        for model_name in models:
            combined["models"][model_name] = _run_model(
                model_name, out / model_folder(model_name), protocols, **settings
            )
            _write(out, combined, start)
    else:
        for model_name, run in _in_processes(models, out, jobs, settings):
            if isinstance(run, str):
                broken.append(f"{model_name} ({run})")
            else:
                combined["models"][model_name] = run
            combined["models"] = {m: combined["models"][m] for m in models if m in combined["models"]}  # in order
            _write(out, combined, start)
    failed = [f"{m} {row['protocol']}" for m, run in combined["models"].items() for row in run["protocols"]
              if row["status"] == "failed"]  # fmt: skip
    _log(f"combined report: {out / 'report.md'}", start)
    if broken:
        raise FullDemoError(f"the demo of {', '.join(broken)} stopped (traceback above); {out / 'report.md'} holds the "
                            "other models; fix it and continue with --resume")  # fmt: skip
    if failed:
        raise FullDemoError(f"{len(failed)} protocol stage(s) failed: {', '.join(failed)}; {out / 'report.md'} lists "
                            "their errors (tracebacks above); fix them and continue with --resume")  # fmt: skip
    return json.loads((out / "summary.json").read_text())  # as written (JSON types), as a later reader sees it


def _write(out: Path, combined: dict[str, Any], start: float) -> None:
    combined["seconds"] = round(time.time() - start, 1)
    combined["machine"]["load_average_at_end"] = list(os.getloadavg())
    atomic_write_text(out / "summary.json", json.dumps(combined, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", full_report(combined))


def _run_model(model_name: str, model_dir: Path, protocols: tuple[FullProtocol, ...], *, sizes: dict[str, int],
               preset: str,
               cell: tuple[int | None, int | None], seed: int, threads: int | None, mode: OutputMode, device: str,
               start: float) -> dict[str, Any]:  # fmt: skip
    """The demo of one model, then each protocol in its own stage folder."""
    from writesae.demo import run_demo

    begin, begin_cpu = time.time(), time.process_time()
    if mode == "resume" and (model_dir / "summary.json").is_file():
        _log(f"{model_name}: the demo in {model_dir} has finished; kept", start)
    else:
        _log(f"{model_name}: the demo, into {model_dir}", start)
        run_demo(model_name, out_dir=model_dir, layer=cell[0], head=cell[1], seed=seed, sizes=sizes, threads=threads,
                 mode=_stage_mode(model_dir, mode), device=device)  # fmt: skip
    demo_seconds, demo_cpu = time.time() - begin, time.process_time() - begin_cpu
    ctx = DemoContext.load(model_name, model_dir, sizes, seed=seed, device=device)
    rows = [_run_stage(entry, ctx, model_dir, preset, mode, start) for entry in protocols]
    run = {"folder": model_dir.name, "cell": ctx.figures["cell"], "layer_types": list(ctx.model.cfg.layer_types),
           "demo_seconds": round(demo_seconds, 1), "seconds": round(time.time() - begin, 1),
           "demo_cpu_seconds": round(demo_cpu, 1), "cpu_seconds": round(time.process_time() - begin_cpu, 1),
           "protocols": rows}  # fmt: skip
    (model_dir / "paper").mkdir(exist_ok=True)
    atomic_write_text(model_dir / "paper" / "summary.json", json.dumps(run, indent=2, default=str) + "\n")
    return run


def _in_processes(models: tuple[str, ...] | list[str], out: Path, jobs: int, settings: dict[str, Any]
                  ) -> Iterator[tuple[str, dict[str, Any] | str]]:  # fmt: skip
    """Run `_run_model` per model in ``jobs`` processes; yield ``(model, its run)`` as each ends (or why it stopped).

    Each process prints its lines prefixed with its model's folder. Stopped here (Ctrl-C, SIGTERM),
    the processes are stopped too; every finished stage is on disk for ``--resume``.
    """
    context = multiprocessing.get_context("spawn")  # a fork of a process that has run torch can hang
    pending, running = list(models), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                process = context.Process(target=_model_process, args=(name, out, settings), name=f"demo-full {name}")
                process.start()
                running[name] = process
            wait([process.sentinel for process in running.values()])
            for name, process in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[name]
                done = out / model_folder(name) / "paper" / "summary.json"
                if process.exitcode == 0 and done.is_file():
                    yield name, json.loads(done.read_text())
                else:
                    yield name, f"exit code {process.exitcode}"
    finally:
        for process in running.values():
            process.terminate()
            process.join()


class _Prefixed:
    """A text stream that starts every line with ``prefix`` (the output of one model's process)."""

    def __init__(self, stream: Any, prefix: str) -> None:
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start and piece.strip():
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith(("\n", "\r"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _model_process(model_name: str, out: Path, settings: dict[str, Any]) -> None:
    """The body of one model's process (`_in_processes`)."""
    sys.stdout = _Prefixed(sys.stdout, f"[{model_folder(model_name)}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[{model_folder(model_name)}] ")
    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    _run_model(model_name, out / model_folder(model_name), FULL_PROTOCOLS, **settings)


def _run_stage(entry: FullProtocol, ctx: DemoContext, model_dir: Path, preset: str, mode: OutputMode,
               start: float) -> dict[str, Any]:  # fmt: skip
    """One protocol on one model: its row of the report (never raises but on Ctrl-C / SIGTERM)."""
    sizes = entry.sizes_for(preset)
    stage = model_dir / "paper" / entry.name
    row: dict[str, Any] = {"protocol": entry.name, "module": entry.module, "what": entry.what, "sizes": sizes,
                           "run_dir": str(Path(model_dir.name) / (entry.demo_run or Path("paper", entry.name))),
                           "in_demo": entry.demo_run is not None, "reason": None, "error": None, "headline": {},
                           "key_figures": [], "seconds": 0.0, "cpu_seconds": 0.0,
                           "after_summary_error": None}  # fmt: skip
    try:
        row["references"] = entry.references()
        reason = entry.applies(ctx)
    except Exception as err:  # noqa: BLE001  e.g. the module does not import: its row says so, the rest runs
        traceback.print_exc()
        return {**row, "references": [], "status": "failed", "error": f"{type(err).__name__}: {err}"}
    if reason is not None:
        _log(f"{ctx.model_name}: {entry.name}: not applicable ({reason})", start)
        return {**row, "status": "not applicable", "reason": reason}
    begin, begin_cpu = time.time(), time.process_time()
    try:
        summary = _summary(entry, ctx, stage, _stage_mode(stage, mode), sizes)
        row["headline"] = _plain(entry.headline(summary))
        row["status"] = "ran"
    except Exception as err:  # noqa: BLE001  a failed protocol is listed in the report; the others still run
        traceback.print_exc()
        row["status"], row["error"] = "failed", f"{type(err).__name__}: {err}"
        written = stage / "summary.json"  # run_protocol writes the summary before the plots and the report
        if entry.demo_run is None and written.is_file() and written.stat().st_mtime >= begin:
            row["headline"] = _plain(entry.headline(json.loads(written.read_text())))
            row["status"], row["error"], row["after_summary_error"] = "ran", None, row["error"]
    row["seconds"], row["cpu_seconds"] = round(time.time() - begin, 1), round(time.process_time() - begin_cpu, 1)
    shown = {k: row["headline"][k] for k in _key_figures(entry, row["headline"])}
    late = (
        f" (then failed after writing its summary: {row['after_summary_error']})" if row["after_summary_error"] else ""
    )
    _log(f"{ctx.model_name}: {entry.name} ({row['seconds']:.0f} s): {row['status']}"
         + (f": {row['error']}" if row["error"] else f"; {_short(shown)}{late}"), start)  # fmt: skip
    row["key_figures"] = list(shown)
    return row


def _summary(
    entry: FullProtocol, ctx: DemoContext, stage: Path, mode: OutputMode, sizes: dict[str, Any]
) -> dict[str, Any]:
    """The protocol's summary: its run into ``stage``, or the demo's own run of it."""
    if entry.demo_run is None:
        return entry.run(ctx, stage, mode, sizes)
    from writesae.protocols.run import load_run

    summary = load_run(ctx.demo_dir / entry.demo_run).summary
    if summary is None:
        raise RuntimeError(
            f"the demo's {entry.demo_run} run in {ctx.demo_dir} has not finished; continue with --resume"
        )
    return summary


def _plain(headline: dict[str, Any]) -> dict[str, Any]:
    """The headline as it reads back from JSON (tuples as lists, no NaN), so a resumed run's rows equal a new one's."""
    return json.loads(json.dumps(jsonable(headline)))


def _key_figures(entry: FullProtocol, headline: dict[str, Any]) -> list[str]:
    from fnmatch import fnmatchcase

    keys = [k for pattern in entry.key_figures for k in headline if fnmatchcase(k, pattern)]
    return keys or list(headline)[:3]


def _short(values: dict[str, Any]) -> str:
    from .report import fmt

    return ", ".join(f"{k} {fmt(v)}" for k, v in values.items())
