"""Stream a store cell to training: block-shuffled, memory-mapped, bounded memory, exactly resumable.

`StoreSource` is the `writesae.data.WriteSource` of an on-disk cell. Its order in an epoch is a
function of ``(seed, epoch)`` and the cell's length only, never of how the cell is split into shard
files, so a store written by many processes trains exactly like one written by a single process:

1. the cell's ``N`` rows are cut into blocks of ``block_size`` consecutive rows;
2. the blocks are put in a seeded random order;
3. consecutive groups of ``window_blocks`` blocks form windows; the rows of a window are shuffled
   together (seeded by epoch and window);
4. batches are consecutive runs of that stream.

Reading a batch copies its rows out of the memory-mapped shards (`writesae.shards.CellRows`,
which releases the mapped pages as it goes), so memory stays at the batches in flight and a few
MiB of mapped pages, whatever the store's size. Blocks keep the reads near-sequential on disk (a
window's blocks come back to the page cache once per batch that draws on them); a window of
``block_size * window_blocks`` rows (16,384 by default) sets how far apart the samples of a batch
can lie in the store.

Data-parallel training reads only its part: `StoreSource.rank_batches` yields, for each global
batch, the rows a given rank owns (`writesae.distributed.rank_range`), so ``W`` ranks read the store once between them.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from hooked_recurrent.files import atomic_save_safetensors
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = atomic_save_safetensors({"states": torch.randn(10, 2, 2), "sequence": torch.arange(10),
    ...                              "position": torch.zeros(10, dtype=torch.long)}, d / "shard.safetensors")
    >>> source = StoreSource(CellRows([d / "shard.safetensors"]), kind="state", seed=0, block_size=2)
    >>> [b.shape[0] for b in source.batches(epoch=0, batch_size=4)]
    [4, 4, 2]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from writesae.distributed import rank_range
from writesae.shards import CellRows

__all__ = ["StoreSource"]

Kind = Literal["state", "write"]


class StoreSource:
    """A cell of a store as a training source (see the module docstring for the order).

    Args:
        rows: The cell's memory-mapped rows.
        kind: ``"state"`` (batches are ``[B, d_k, d_v]`` states) or ``"write"`` (``(keys, values)``).
        shuffle: Shuffle blocks and rows (off: storage order, e.g. for validation).
        seed: Seed of the order.
        block_size: Rows per block (consecutive on disk).
        window_blocks: Blocks shuffled together.
        pin_memory: Copy batches into page-locked memory (asynchronous copies to a GPU).
    """

    def __init__(
        self,
        rows: CellRows,
        *,
        kind: Kind,
        shuffle: bool = True,
        seed: int = 0,
        block_size: int = 256,
        window_blocks: int = 64,
        pin_memory: bool = False,
    ) -> None:
        for name, value in (("block_size", block_size), ("window_blocks", window_blocks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value}); it sets how many rows are shuffled together")
        self.rows, self.kind, self.shuffle, self.seed = rows, kind, shuffle, seed
        self.block_size, self.window_blocks, self.pin_memory = block_size, window_blocks, pin_memory

    @property
    def num_samples(self) -> int:
        return self.rows.num_rows

    def _generator(self, epoch: int, window: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1_009 + window)

    def windows(self, epoch: int) -> Iterator[Int[Tensor, " rows"]]:
        """The epoch's windows, each the global row indices it yields, in stream order."""
        n, size = self.num_samples, self.block_size
        n_blocks = -(-n // size)
        blocks = torch.randperm(n_blocks, generator=self._generator(epoch, -1)) if self.shuffle else torch.arange(n_blocks)
        for w, first in enumerate(range(0, n_blocks, self.window_blocks)):
            index = (blocks[first : first + self.window_blocks, None] * size + torch.arange(size)).flatten()
            index = index[index < n]  # the cell's last block may be short
            if self.shuffle:
                index = index[torch.randperm(len(index), generator=self._generator(epoch, w))]
            yield index

    def index_batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[Int[Tensor, " batch"]]:
        """The row indices of the epoch's batches from batch ``start`` on (skipped batches cost no reading)."""
        pending = torch.empty(0, dtype=torch.long)
        number = 0
        for window in self.windows(epoch):
            pending = torch.cat([pending, window])
            while len(pending) >= batch_size:
                if number >= start:
                    yield pending[:batch_size]
                pending, number = pending[batch_size:], number + 1
        if len(pending) and number >= start:
            yield pending

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """The epoch's batches of ``batch_size`` samples (the last may be smaller), from batch ``start``."""
        for index in self.index_batches(epoch, batch_size, start):
            yield self._batch(index)

    def rank_batches(
        self, epoch: int, batch_size: int, start: int, rank: int, world_size: int
    ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """The rows ``rank`` owns of each global batch (`writesae.distributed.rank_range`); reads only those."""
        for index in self.index_batches(epoch, batch_size, start):
            yield self._batch(index[slice(*rank_range(len(index), rank, world_size))])

    def _batch(self, index: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.kind == "state":
            return self.rows.gather(index, self.pin_memory, names=("states",))["states"]
        rows = self.rows.gather(index, self.pin_memory, names=("keys", "values"))
        return rows["keys"], rows["values"]
