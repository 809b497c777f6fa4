"""Sweep grids: the file format and its errors, cell identity, and resuming (a finished cell is never
trained again; an interrupted one continues to the uninterrupted weights). Spreading cells over
torchrun's ranks is tested in test_distributed.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import random_tokens, tiny_pair
from writesae.store import collect
from writesae.sweep import SweepGrid, load_grid, run_sweep, train_cell
from writesae.sweep.runner import store_digest
from writesae.trainer import WriteSAETrainer


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = tiny_pair("tiny-random:qwen3.5")[0]
    out = tmp_path_factory.mktemp("sweep") / "store"
    return collect(model, random_tokens(16, 24, seed=3), layers=[0], heads=[1, 2], kind="write", out_dir=out, verbose=False)


def grid(store, **grid):
    """A grid of tiny cells over the keys given; every other setting fixed."""
    fixed = {"layer": 0, "d_sae": 16, "k": 2, "epochs": 2, "batch_size": 32, "checkpoint_every": 3,
             "input_scaling": "unit_mean_square"}  # fmt: skip
    fixed = {k: v for k, v in fixed.items() if k not in grid}
    return SweepGrid.from_dict({"store": str(store.path), "grid": grid, "fixed": fixed})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must hold a mapping"),
        ({"grid": {"k": [1]}}, "needs 'store'"),
        ({"store": "s", "grid": {"k": [1]}, "fixed": {"head": 0}}, "'layer' is missing"),
        ({"store": "s", "grid": {"layer": [0], "head": [0], "lrate": [1]}}, "unknown setting 'lrate'; a sweep can set layer"),
        ({"store": "s", "grid": {"layer": [0], "head": []}}, "grid key 'head' must list at least one value"),
        ({"store": "s", "grid": {"layer": [0, 0], "head": [0]}}, "repeats a value"),
        ({"store": "s", "grid": {"layer": [0], "head": [0]}, "fixed": {"head": 1}}, "both in 'grid' and in 'fixed'"),
        ({"store": "s", "grid": {"layer": [0], "head": [0]}, "output": "x"}, "unknown top-level keys \\['output'\\]"),
    ],
)
def test_bad_grids_are_refused_naming_the_fix(data, message):
    with pytest.raises(ValueError, match=message):
        SweepGrid.from_dict(data, "g.yaml")


def test_grid_files_cells_and_their_identity(store, tmp_path):
    (tmp_path / "g.yaml").write_text(f"store: {store.path}\ngrid:\n  head: [1, 2]\n  lr: [3e-4, 1E-3]\nfixed: {{layer: 0}}\n")
    loaded = load_grid(tmp_path / "g.yaml")
    assert loaded.grid["lr"] == [3e-4, 1e-3]  # YAML 1.1 would read 3e-4 as a string
    names = [c.name for c in loaded.cells()]
    assert names == ["L0_H1_0.0003", "L0_H1_0.001", "L0_H2_0.0003", "L0_H2_0.001"]
    (tmp_path / "g.json").write_text(json.dumps({"store": str(store.path), "grid": {"head": [1, 2], "lr": [3e-4, 1e-3]},
                                                 "fixed": {"layer": 0}}))  # fmt: skip
    assert [c.id for c in load_grid(tmp_path / "g.json").cells("x")] == [c.id for c in loaded.cells("x")]
    assert loaded.cells("x")[0].id != loaded.cells("another store")[0].id
    with pytest.raises(ValueError, match="unknown file type '.toml'"):
        (tmp_path / "g.toml").write_text("")
        load_grid(tmp_path / "g.toml")
    with pytest.raises(ValueError, match="cell L0_H3_k2 needs layer 0 head 3, which store .* does not hold"):
        run_sweep(grid(store, head=[3], k=[2]), tmp_path / "x", verbose=False)
    with pytest.raises(ValueError, match="cell L0_H1_k99: k must be in \\[1, d_sae=16\\]"):
        run_sweep(grid(store, head=[1], k=[99]), tmp_path / "x", verbose=False)


def test_resuming_skips_finished_cells_and_continues_an_interrupted_one(store, tmp_path, monkeypatch):
    real, calls = WriteSAETrainer.train_step, []

    def stop_second_cell_at_step_4(self, batch):
        calls.append(self.step)
        if len(calls) > 8 and self.step == 4:
            raise KeyboardInterrupt
        return real(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(WriteSAETrainer, "train_step", stop_second_cell_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(grid(store, head=[1, 2]), tmp_path / "cut", verbose=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(grid(store, head=[1, 2]), tmp_path / "cut", verbose=False)
    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(WriteSAETrainer, "train_step", lambda self, batch: calls.append(self.step) or real(self, batch))
        resumed = run_sweep(grid(store, head=[1, 2]), tmp_path / "cut", mode="resume", verbose=False)
    assert min(calls) == 3  # only the interrupted cell trained, from its checkpoint at step 3
    assert [r["resumed"] for r in resumed.rows] == [False, True]
    cell = grid(store, head=[1, 2]).cells(store_digest(store))[1]
    train_cell(cell, store, tmp_path / "alone")  # the same cell, never interrupted
    a, b = (load_file(d / "sae" / "sae_weights.safetensors") for d in (tmp_path / "alone", tmp_path / "cut" / "cells" / cell.id))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A grown grid names the finished cell L0_H2_k2 now; it is found by its settings, not retrained.
    grown = run_sweep(grid(store, head=[2], k=[2, 3]), tmp_path / "cut", mode="resume", verbose=False)
    assert [r["cell"] for r in grown.rows][0] == cell.id and grown.rows[0]["seconds"] == resumed.rows[1]["seconds"]
    assert grown.rows[1]["k"] == 3 and (tmp_path / "cut" / "results.csv").read_text().count("\n") == 3
