"""What each process does in tests/test_distributed.py's one torchrun launch (gloo, CPU).

Usage: torchrun --standalone --nproc-per-node 2 tests/torchrun_worker.py SPEC.json
SPEC's tasks run in turn, every rank taking part in each, inside one process group:
``collect`` (the ``writesae collect`` command's arguments), ``train`` (`train_on_store`'s, one
SAE data-parallel) and ``sweep`` (a grid and an output folder).
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # the parent test runs its references with one thread too

from writesae.cli import main as writesae  # noqa: E402
from writesae.distributed import process_group  # noqa: E402
from writesae.sweep import SweepGrid, run_sweep  # noqa: E402
from writesae.trainer import TrainerConfig  # noqa: E402
from writesae.training import train_on_store  # noqa: E402


def run(spec: dict) -> None:
    with process_group("cpu") as world:
        assert world.world_size == 2, world
        if writesae(spec["collect"]) != 0:
            raise SystemExit(f"rank {world.rank}: writesae collect failed")
        task = spec["train"]
        trainer = TrainerConfig(**task["trainer"], progress=False)
        sae, metrics = train_on_store(task["store"], **task["cell"], trainer=trainer, world=world)
        if world.is_main:
            sae.save_model(Path(task["out"]))
            (Path(task["out"]) / "metrics.json").write_text(json.dumps(metrics))
        task = spec["sweep"]
        run_sweep(SweepGrid.from_dict(task["grid"]), task["out"], world=world, verbose=False)


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
