"""Run a sweep: every cell of a grid trained once, cells spread over the ranks ``torchrun`` started.

Each rank trains whole cells on its own device (``--device cuda``: the GPU of its ``LOCAL_RANK``),
so ``torchrun --nproc-per-node 8`` keeps eight GPUs busy with eight cells at a time, and
``--nnodes`` adds machines (the output folder must then be on a file system every node sees).
Without ``torchrun`` one process trains every cell in turn.

Output folder::

    out/
      grid.json                        the grid of the latest run
      cells/<cell id>/
        train/                         the trainer's log and checkpoint/ (resumable), best/, final/
        sae/                           the SAE with the best validation MSE
        substitution/                  the substitution test, when the grid asks for it
        result.json                    written last: the cell's settings and metrics
      results.csv, results.jsonl       one row per cell
      summary.json, report.md, *.png   the table, the best cells, the plots (`writesae.sweep.results`)

Resuming (``mode="resume"``, ``--resume``): a cell with a ``result.json`` is finished and never
trained again; a cell with a checkpoint continues from it (and ends with the weights an
uninterrupted run would have); any other cell starts afresh. Rank 0 decides which cells are left
and deals them out round-robin, so every rank agrees whatever the others have written meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hooked_recurrent.files import atomic_write_text

from writesae.distributed import World, barrier, on_main, rank_device
from writesae.outputs import jsonable, prepare_output_dir
from writesae.store import WriteStore
from writesae.sweep.grid import SubstitutionSettings, SweepCell, SweepGrid
from writesae.sweep.results import write_results

__all__ = ["run_sweep", "train_cell", "store_digest", "SweepResult", "RESULT_FILE"]

RESULT_FILE = "result.json"
METRICS = ("val_mse", "val_nmse", "val_explained_variance", "val_dead_fraction", "val_l0", "best_val_mse")


@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes:
        rows: One dict per cell, in grid order: its settings, then its metrics.
        out_dir: The sweep's folder.
    """

    rows: list[dict[str, Any]]
    out_dir: Path


def store_digest(store: WriteStore) -> str:
    """A hash of the store's manifest: part of every cell's identity (`writesae.sweep.SweepCell.digest`)."""
    return hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()[:16]


def _check_cells(cells: list[SweepCell], store: WriteStore, source: str) -> None:
    """Build every cell's configs before any training, so a bad value stops the sweep at once."""
    from writesae.config import WriteTrainingSAEConfig
    from writesae.trainer import TrainerConfig

    d_k, d_v = store.manifest["model"]["d_k"], store.manifest["model"]["d_v"]
    for cell in cells:
        if f"L{cell.layer}_H{cell.head}" not in store.manifest["cells"]:
            have = ", ".join(store.manifest["cells"])
            raise ValueError(f"sweep grid {source}: cell {cell.name} needs layer {cell.layer} head {cell.head}, "
                             f"which store {store.path} does not hold (it has {have}); collect them first")
        try:
            TrainerConfig(**cell.trainer_kwargs())
            WriteTrainingSAEConfig.build(d_k=d_k, d_v=d_v, **cell.sae_kwargs())
        except (TypeError, ValueError) as err:
            raise ValueError(f"sweep grid {source}: cell {cell.name}: {err}") from None


class SubstitutionTest:
    """The model and held-out tokens of the per-cell substitution test, loaded once per rank."""

    def __init__(self, settings: SubstitutionSettings, model_name: str, device: torch.device) -> None:
        self.settings, self.model_name, self.device = settings, settings.model or model_name, device
        self._model: Any = None

    def win_rate(self, sae: Any, out_dir: Path) -> dict[str, Any]:
        from writesae.outputs import holds_files
        from writesae.protocols.substitution import SubstitutionConfig, run_substitution

        if self._model is None:
            from hooked_recurrent import HookedRecurrentModel
            from writesae.tokens import token_blocks

            self._model = HookedRecurrentModel.from_pretrained(self.model_name, device=str(self.device))
            s = self.settings
            self._tokens = token_blocks(self._model, s.tokens, split="val", n_sequences=s.sequences, seq_len=s.seq_len)
        config = SubstitutionConfig(max_firings_per_atom=self.settings.max_firings_per_atom,
                                    n_bootstrap=self.settings.n_bootstrap)  # fmt: skip
        mode = "resume" if holds_files(out_dir) else "new"  # a cell stopped mid-test continues its record log
        result = run_substitution(self._model, sae, self._tokens.to(self.device), config=config, out_dir=out_dir, mode=mode,
                                  verbose=False)  # fmt: skip
        headline = result.summary.get("headline", {})  # absent when no atom fired
        return {"win_rate": headline.get("win_rate"), "n_firings": result.summary["n_firings"]}


def train_cell(
    cell: SweepCell,
    store: WriteStore,
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    substitution: SubstitutionTest | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Train one cell into ``directory`` (resuming its checkpoint if there is one); returns its row.

    The row (the cell's settings and its validation metrics) is also written, last and atomically,
    to ``directory/result.json``, which marks the cell finished.
    """
    from writesae.trainer import TrainerConfig
    from writesae.training import train_on_store

    directory = Path(directory)
    train_dir = directory / "train"
    resume = train_dir / "checkpoint" if (train_dir / "checkpoint").is_dir() else None
    if resume is None:  # a start that never reached its first checkpoint: begin again, clean
        prepare_output_dir(train_dir, "overwrite", what="cell's training")
    start = time.time()
    trainer = TrainerConfig(**cell.trainer_kwargs(), seed=cell.seed, out_dir=train_dir, progress=False)
    sae, metrics = train_on_store(store, cell.layer, cell.head, trainer=trainer, seed=cell.seed, resume_from=resume,
                                  device=str(device), **cell.sae_kwargs())  # fmt: skip
    sae.save_model(directory / "sae")
    row = {**cell.row(), "cell": directory.name, **{m: metrics.get(m) for m in METRICS}}
    if substitution is not None:
        row.update(substitution.win_rate(sae, directory / "substitution"))
    row.update(seconds=round(time.time() - start, 2), resumed=resume is not None, rank=rank, device=str(device))
    atomic_write_text(directory / RESULT_FILE, json.dumps(jsonable(row), indent=2) + "\n")
    return row


def run_sweep(
    grid: SweepGrid,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    mode: str = "new",
    world: World | None = None,
    verbose: bool = True,
) -> SweepResult:
    """Train every cell of ``grid`` not yet finished in ``out_dir``, then write the results table.

    Args:
        grid: The grid (`writesae.sweep.load_grid`).
        out_dir: The sweep's folder (see the module docstring).
        device: ``"cpu"``, ``"cuda"`` (each rank: the GPU of its ``LOCAL_RANK``) or ``"cuda:N"`` (one process).
        mode: ``"new"``, ``"resume"`` (continue an interrupted or grown sweep) or ``"overwrite"``.
        world: The processes sharing the cells (default: from ``torchrun``'s environment; under
            ``torchrun`` call this inside `writesae.distributed.process_group`).
        verbose: A progress bar over this rank's cells.

    Returns:
        Every cell's row (on every rank).
    """
    world = World.from_env() if world is None else world
    if world.distributed and not dist.is_initialized():
        raise RuntimeError(
            f"run_sweep runs as rank {world.rank} of {world.world_size} but no process group exists; "
            "call it inside `with writesae.distributed.process_group(device):`"
        )
    store = WriteStore(grid.store)
    cells = grid.cells(store_digest(store))
    _check_cells(cells, store, grid.source)
    out = on_main(lambda: _prepare(out_dir, mode, grid), world)
    folders = on_main(lambda: {c.id: _cell_dir(out, c) for c in cells}, world)
    mine = [c for c in cells if not (folders[c.id] / RESULT_FILE).is_file()][world.rank :: world.world_size]
    target = rank_device(device, world)
    substitution = SubstitutionTest(grid.substitution, store.model_name, target) if grid.substitution else None
    desc = f"sweep (rank {world.rank})" if world.distributed else "sweep"
    for cell in tqdm(mine, desc=desc, unit="cell", disable=not verbose):
        train_cell(cell, store, folders[cell.id], target, substitution, world.rank)
    barrier(world)
    rows = on_main(lambda: write_results(out, grid, [_read_row(folders[c.id]) for c in cells]), world)
    return SweepResult(rows, out)


def _cell_dir(out: Path, cell: SweepCell) -> Path:
    """The cell's folder: an earlier run's folder of the same cell (same digest), or a new one."""
    earlier = sorted((out / "cells").glob(f"*-{cell.digest}"))
    return earlier[0] if earlier else out / "cells" / cell.id


def _prepare(out_dir: str | os.PathLike, mode: str, grid: SweepGrid) -> Path:
    out = prepare_output_dir(out_dir, mode, what="sweep")
    record = {"store": str(grid.store), "grid": grid.grid, "fixed": grid.fixed,
              "substitution": grid.substitution, "source": grid.source}  # fmt: skip
    atomic_write_text(out / "grid.json", json.dumps(jsonable(record), indent=2) + "\n")
    return out


def _read_row(directory: Path) -> dict[str, Any]:
    path = directory / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"cell {directory.name} has no {RESULT_FILE} after the sweep; did a rank fail? Rerun with --resume")
    return json.loads(path.read_text())
