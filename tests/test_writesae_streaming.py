"""Streaming a store cell: every sample once per epoch, an order that ignores shard boundaries,
exact resume, rank parts that add up to the global batches, and damaged shards named."""

import pytest
import torch

from hooked_recurrent.files import atomic_save_safetensors
from writesae.shards import CellRows, ShardError
from writesae.streaming import StoreSource


def write_cell(directory, states, shard_sizes):
    """The same samples cut into shards of the given sizes; returns their paths in order."""
    paths, begin = [], 0
    for i, size in enumerate(shard_sizes):
        rows = slice(begin, begin + size)
        paths.append(atomic_save_safetensors(
            {"states": states[rows], "sequence": torch.arange(len(states))[rows], "position": torch.zeros(size, dtype=torch.long)},
            directory / f"shard_{i:05d}.safetensors",
        ))
        begin += size
    assert begin == len(states)
    return paths


@pytest.fixture
def states():
    """bf16 samples whose first entry is their storage index (integers to 256 are exact in bf16)."""
    x = torch.randn(203, 3, 2, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0] = torch.arange(203)
    return x.to(torch.bfloat16)


def source(paths, **kw):
    return StoreSource(CellRows(paths), kind="state", seed=5, block_size=8, window_blocks=4, **kw)


def test_each_epoch_yields_every_sample_once_in_an_order_independent_of_shards(states, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    one = source(write_cell(tmp_path / "a", states, [203]))
    paths = write_cell(tmp_path / "b", states, [50, 1, 77, 75])
    many = source(paths)
    for epoch in (0, 1):
        batches = list(one.batches(epoch, 32))
        assert [len(b) for b in batches] == [32] * 6 + [11]
        assert all(torch.equal(x, y) for x, y in zip(batches, many.batches(epoch, 32), strict=True))
        seen = torch.cat(batches)
        assert torch.equal(seen[seen[:, 0, 0].float().argsort()], states)  # every sample exactly once
    assert not torch.equal(next(one.batches(0, 32)), next(one.batches(1, 32)))
    # a batch mixes blocks of 8 consecutive samples, and rows within them: not storage order
    positions = next(one.batches(0, 32))[:, 0, 0].long().tolist()
    assert len({p // 8 for p in positions}) > 1 and positions != sorted(positions)
    unshuffled = StoreSource(CellRows(paths), kind="state", shuffle=False)
    assert torch.equal(torch.cat(list(unshuffled.batches(0, 64))), states)


def test_resume_and_rank_parts(states, tmp_path):
    src = source(write_cell(tmp_path, states, [60, 143]))
    full = list(src.batches(2, 24))
    assert all(torch.equal(x, y) for x, y in zip(full[3:], src.batches(2, 24, start=3), strict=True))
    for world in (2, 3):
        parts = [list(src.rank_batches(2, 24, 3, rank, world)) for rank in range(world)]
        for b, global_batch in enumerate(full[3:]):
            assert torch.equal(torch.cat([part[b] for part in parts]), global_batch)


def test_damaged_or_mismatched_shards_are_named(states, tmp_path):
    paths = write_cell(tmp_path, states, [100, 103])
    atomic_save_safetensors({"states": states[:5, :2]}, tmp_path / "odd.safetensors")
    with pytest.raises(ShardError, match="odd.safetensors"):
        CellRows([paths[0], tmp_path / "odd.safetensors"])
    paths[1].write_bytes(paths[1].read_bytes()[:-10])
    with pytest.raises(OSError, match="shard_00001.*damaged"):
        CellRows(paths)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        StoreSource(CellRows(paths[:1]), kind="state", block_size=0)
    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        CellRows(paths[:1]).gather(torch.tensor([100]))
