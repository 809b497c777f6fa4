"""torch.distributed on CPU: torchrun's environment, and one torchrun launch of 2 gloo processes
whose results must equal the same work done in this one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_pair
from writesae.distributed import World, on_main, rank_device, rank_range
from writesae.store import WriteStore, collect
from writesae.sweep import SweepGrid, train_cell
from writesae.sweep.runner import store_digest
from writesae.trainer import TrainerConfig
from writesae.training import train_on_store

WORKER = Path(__file__).with_name("torchrun_worker.py")


def test_world_from_torchrun_environment():
    assert World.from_env({}) == World(0, 1, 0)
    world = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.world_size, world.local_rank, world.is_main, world.distributed) == (3, 4, 1, False, True)
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        World.from_env({"WORLD_SIZE": "two"})
    assert rank_device("cpu", world) == torch.device("cpu")
    with pytest.raises(ValueError, match="pass --device cuda"):
        rank_device("cuda:1", world)
    shares = [rank_range(10, r, 3) for r in range(3)]
    assert shares == [(0, 3), (3, 6), (6, 10)]
    assert on_main(lambda: 7, World()) == 7
    with pytest.raises(KeyError, match="boom"):
        on_main(lambda: {}["boom"], World())


COLLECT = ["collect", "tiny-random:qwen3.5", "--tokens", "random", "--sequences", "18", "--seq-len", "16", "--layer", "0", "1",
           "--heads", "0", "2", "--kind", "state", "--positions-per-sequence", "6", "--batch-size", "4", "--center",
           "--device", "cpu"]  # fmt: skip
# An odd global batch (ranks hold 14 and 15 samples), AuxK, resampling, re-normalisation, a fixed
# input mean and input scaling within a few epochs: every quantity the ranks must share is used.
TRAIN = {"cell": {"layer": 0, "head": 1, "d_sae": 32, "k": 2, "seed": 0, "input_mean": "fixed", "k_aux": 8},
         "trainer": {"batch_size": 29, "epochs": 3, "lr": 3e-3, "warmup_steps": 2, "dead_steps": 3, "resample_every": 7,
                     "renorm_every": 5, "input_scaling": "unit_mean_square"}}  # fmt: skip


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch (2 processes, gloo) running every task of the spec; returns the spec."""
    tmp = tmp_path_factory.mktemp("torchrun")
    model = tiny_pair("tiny-random:qwen3.5")[0]
    tokens = torch.randint(3, 256, (24, 24), generator=torch.Generator().manual_seed(0))
    collect(model, tokens, layers=[0, 1], heads=[1, 2], kind="write", out_dir=tmp / "store", verbose=False)
    grid = {"store": str(tmp / "store"), "grid": {"layer": [0, 1], "variant": ["bilinear", "flat"]},
            "fixed": {"head": 1, "d_sae": 16, "k": 3, "epochs": 2, "batch_size": 32, "input_scaling": "unit_mean_square"}}
    spec = {"collect": [*COLLECT, "--out", str(tmp / "collected")],
            "train": {**TRAIN, "store": str(tmp / "store"), "trainer": {**TRAIN["trainer"], "out_dir": str(tmp / "ddp")},
                      "out": str(tmp / "ddp" / "sae")},
            "sweep": {"grid": grid, "out": str(tmp / "sweep")}}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(tmp / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return spec


def test_collection_on_two_ranks_equals_one_process_sample_for_sample(launched, tmp_path):
    from writesae.cli import main

    assert main([*COLLECT, "--out", str(tmp_path / "single")]) == 0
    single, ranked = WriteStore(tmp_path / "single"), WriteStore(launched["collect"][-1])
    for layer in (0, 1):
        for head in (0, 2):
            for split in ("train", "val"):
                a, b = single.read(layer, head, split), ranked.read(layer, head, split)
                assert a.keys() == b.keys() and len(a["sequence"]) > 0
                assert all(torch.equal(a[k], b[k]) for k in a), (layer, head, split)
            # float64 sums added in another order: equal to rounding
            torch.testing.assert_close(single.mean(layer, head), ranked.mean(layer, head), rtol=1e-12, atol=1e-15)
    files = ranked.manifest["cells"]["L0_H0"]["train"]["files"]
    assert [f.split("_")[0] for f in files] == ["rank00000", "rank00001"]  # each rank wrote its own shard
    assert ranked.manifest["sequences"] == single.manifest["sequences"]


def test_data_parallel_training_equals_one_process_with_the_same_global_batch(launched, tmp_path):
    task = launched["train"]
    trainer = TrainerConfig(**{**task["trainer"], "out_dir": str(tmp_path / "single")}, progress=False)
    sae, metrics = train_on_store(task["store"], **task["cell"], trainer=trainer)
    ranked = load_file(Path(task["out"]) / "sae_weights.safetensors")
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(ranked[name], tensor, rtol=1e-5, atol=1e-6, msg=name)  # seen: 3e-7 apart
    ranked_metrics = json.loads((Path(task["out"]) / "metrics.json").read_text())
    for key in ("val_mse", "val_explained_variance", "val_l0", "val_dead_fraction"):
        assert ranked_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    logs = [(Path(d) / "train_log.jsonl").read_text().splitlines() for d in (task["trainer"]["out_dir"], tmp_path / "single")]
    assert len(logs[0]) == len(logs[1])  # rank 0 alone wrote the log: one line per step and validation
    resampled = [json.loads(line).get("resampled", 0) for line in logs[0]]
    assert sum(resampled) > 0  # resampling drew from the gathered global batch


def test_sweep_on_two_ranks_equals_its_cells_trained_one_by_one(launched, tmp_path):
    grid = SweepGrid.from_dict(launched["sweep"]["grid"])
    out = Path(launched["sweep"]["out"])
    store = WriteStore(grid.store)
    cells = grid.cells(store_digest(store))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == [c.id for c in cells]  # one table, in grid order
    assert {r["rank"] for r in rows} == {0, 1}  # the cells were spread over both ranks
    for cell, row in zip(cells, rows):
        alone = train_cell(cell, store, tmp_path / cell.id)
        for metric in ("val_mse", "val_explained_variance", "val_dead_fraction", "val_l0"):
            assert row[metric] == alone[metric], (cell.id, metric)
        ranked = load_file(out / "cells" / cell.id / "sae" / "sae_weights.safetensors")
        single = load_file(tmp_path / cell.id / "sae" / "sae_weights.safetensors")
        assert ranked.keys() == single.keys()
        assert all(torch.equal(ranked[k], single[k]) for k in ranked), cell.id
    assert (out / "report.md").is_file() and (out / "by_variant.png").is_file()
