"""What each process does in tests/test_distributed.py's one torchrun launch (gloo, CPU).

Usage: torchrun --standalone --nproc-per-node 2 tests/torchrun_worker.py SPEC.json
SPEC holds the tasks, each run by every rank in turn inside one process group:
``{"sweep": {"grid": {...}, "out": DIR}}``.
"""

import json
import sys

import torch

torch.set_num_threads(1)  # the parent test runs its reference with one thread too

from writesae.distributed import process_group  # noqa: E402
from writesae.sweep import SweepGrid, run_sweep  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    with process_group("cpu") as world:
        assert world.world_size == 2, world
        if "sweep" in spec:
            task = spec["sweep"]
            run_sweep(SweepGrid.from_dict(task["grid"]), task["out"], world=world, verbose=False)


if __name__ == "__main__":
    main(sys.argv[1])
