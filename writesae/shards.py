"""Memory-mapped reading of a store cell's shards: any rows, copied out, with bounded memory.

A cell of a `WriteStore` (one split of one layer and head) is a list of safetensors shards that
together hold ``N`` samples. `CellRows` maps every shard into memory (``mmap``; nothing is read
until touched) and treats the list as one array of ``N`` rows: ``gather(index)`` copies the rows
at any global indices into fresh tensors, reading only the pages that hold them.

Why this bounds memory: the only allocations are the gathered rows. The mapped pages a gather
touches count in the process's resident set while they stay mapped, and one fault can map a whole
page-cache folio (up to 2 MiB on current kernels, whatever the row's size), so a gather reads its
rows in storage order, one aligned 2 MiB region at a time, and tells the kernel after each region
that the process no longer needs its pages (``madvise(MADV_DONTNEED)``: the data stay in the page
cache, which the kernel evicts as it likes, and a later read maps them again). The mapped pages
resident at any moment are therefore a region or two, however large the store.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from hooked_recurrent.files import atomic_save_safetensors
    >>> d = Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     _ = atomic_save_safetensors({"x": torch.arange(3.0) + 3 * i}, d / f"shard_{i}.safetensors")
    >>> rows = CellRows(sorted(d.glob("*.safetensors")))
    >>> rows.num_rows, rows.gather(torch.tensor([5, 0, 3]))["x"].tolist()
    (6, [5.0, 0.0, 3.0])
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from writesae.io import CheckpointError, read_safetensors_header

__all__ = ["MappedShard", "CellRows", "ShardError"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


# A page-cache folio is at most 2 MiB (x86-64 and 4 KiB-page arm64); a fault on a mapped file can
# map a whole folio, so pages are released in aligned regions of this size.
RELEASE_SPAN = 2 * 2**20


class ShardError(OSError):
    """A store shard is missing, truncated or does not fit the other shards of its cell."""


def _damaged(path: Path, why: object) -> ShardError:
    return ShardError(f"cannot read store shard {path}: {why}. The file is damaged; re-run collect().")


class MappedShard:
    """One safetensors file mapped into memory; its tensors are views of the mapping.

    The mapping is private and never written (``ACCESS_COPY``), so a view can be handed to torch
    as a writable buffer without ever changing the file.

    Args:
        path: The shard file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            header = read_safetensors_header(self.path)
        except CheckpointError as err:
            raise _damaged(self.path, err) from None
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, info in self.entries.items():
            if info["dtype"] not in _DTYPES:
                raise _damaged(self.path, f"tensor {name!r} has dtype {info['dtype']}, which stores never hold")
        with open(self.path, "rb") as f:
            self.data_offset = 8 + int.from_bytes(f.read(8), "little")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> Tensor:
        """A view of tensor ``name`` inside the mapping (no copy; pages load when read)."""
        info = self.entries[name]
        begin, end = (self.data_offset + o for o in info["data_offsets"])
        return self._bytes[begin:end].view(_DTYPES[info["dtype"]]).view(self.shape(name))

    def row_bytes(self, name: str) -> int:
        return math.prod(self.shape(name)[1:]) * _DTYPES[self.entries[name]["dtype"]].itemsize

    def release_rows(self, first: int, last: int) -> None:
        """Release the pages holding rows ``[first, last)`` of every tensor, widened to whole
        `RELEASE_SPAN`-aligned regions (a fault may have mapped the whole folio around a row)."""
        for name, info in self.entries.items():
            begin = self.data_offset + info["data_offsets"][0]
            self._release(begin + first * self.row_bytes(name), begin + last * self.row_bytes(name))

    def _release(self, begin: int, end: int) -> None:
        if not hasattr(self._map, "madvise"):  # Windows: the kernel trims working sets itself
            return
        begin = begin // RELEASE_SPAN * RELEASE_SPAN
        end = min(len(self._map), -(-end // RELEASE_SPAN) * RELEASE_SPAN)
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class CellRows:
    """The shards of one cell as a single array of rows, read through memory maps.

    Args:
        shards: The shard files, in storage order (row ``i`` of the cell is the ``i``-th row of
            their concatenation). Every shard holds the same tensor names and row shapes.
    """

    def __init__(self, shards: Sequence[str | os.PathLike]) -> None:
        self.shards = [MappedShard(s) for s in shards]
        counts = []
        first = self.shards[0] if self.shards else None
        for shard in self.shards:
            assert first is not None
            if set(shard.entries) != set(first.entries):
                raise _damaged(shard.path, f"it holds {sorted(shard.entries)}, {first.path.name} holds {sorted(first.entries)}")
            lengths = {name: shard.shape(name)[0] for name in shard.entries}
            if len(set(lengths.values())) != 1:
                raise _damaged(shard.path, f"its tensors have different numbers of rows ({lengths})")
            for name in shard.entries:
                same = shard.shape(name)[1:] == first.shape(name)[1:]
                if not same or shard.entries[name]["dtype"] != first.entries[name]["dtype"]:
                    raise _damaged(shard.path, f"tensor {name!r} does not match the cell's first shard {first.path.name}")
            counts.append(next(iter(lengths.values())))
        self.counts = counts
        # offsets[s] is the global index of shard s's first row; offsets[-1] the number of rows.
        self.offsets = torch.tensor([0, *counts]).cumsum(0)
        self.names = sorted(first.entries) if first else []
        self._views = [{name: shard.tensor(name) for name in self.names} for shard in self.shards]
        widest = max((first.row_bytes(n) for n in self.names), default=1) if first else 1
        self._region_rows = max(1, RELEASE_SPAN // widest)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def row_bytes(self) -> int:
        """Bytes of one row over all of the cell's tensors."""
        return sum(self.shards[0].row_bytes(n) for n in self.names) if self.shards else 0

    def gather(
        self, index: Int[Tensor, " n"], pin_memory: bool = False, names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Copies of the rows at global indices ``index`` (any order, repeats allowed).

        Rows are read in storage order, a region of at most `RELEASE_SPAN` bytes at a time, and
        each region's pages are released once copied: the mapped pages resident at any moment
        stay within a region or two, whatever ``index`` spans.

        Args:
            index: Row indices in ``[0, num_rows)`` (a CPU tensor).
            pin_memory: Allocate the copies in page-locked memory, for asynchronous copies to a GPU.
            names: The tensors to read (default: all).
        """
        names = self.names if names is None else list(names)
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < self.num_rows):
            raise IndexError(f"row indices must lie in [0, {self.num_rows}); got {int(index.min())}..{int(index.max())}")
        out = {}
        for name in names if self.shards else ():
            view = self._views[0][name]
            out[name] = torch.empty((len(index), *view.shape[1:]), dtype=view.dtype, pin_memory=pin_memory)
        if not len(index):
            return out
        order = index.argsort()
        shard_of = torch.searchsorted(self.offsets[1:], index[order], right=True)
        local = index[order] - self.offsets[shard_of]
        region = local // self._region_rows
        new = torch.ones(len(index), dtype=torch.bool)
        new[1:] = (shard_of[1:] != shard_of[:-1]) | (region[1:] != region[:-1])
        bounds = [*new.nonzero().squeeze(1).tolist(), len(index)]
        for begin, end in zip(bounds[:-1], bounds[1:]):
            shard, rows = int(shard_of[begin]), local[begin:end]
            for name in names:
                chunk = self._views[shard][name].index_select(0, rows)
                self._check_finite(shard, name, chunk, rows)
                out[name].index_copy_(0, order[begin:end], chunk)
            self.shards[shard].release_rows(int(rows[0]), int(rows[-1]) + 1)
        return out

    def _check_finite(self, shard: int, name: str, chunk: Tensor, rows: Tensor) -> None:
        """Refuse NaN or inf read from a shard, naming the shard, the row and its token."""
        if not chunk.is_floating_point():
            return
        finite = torch.isfinite(chunk).reshape(len(chunk), -1).all(1)
        if bool(finite.all()):
            return
        row = int(rows[int((~finite).nonzero()[0])])
        views = self._views[shard]
        where = f" (sequence {int(views['sequence'][row])}, position {int(views['position'][row])})" if "sequence" in views else ""
        raise ValueError(
            f"store shard {self.shards[shard].path}: row {row}{where} of {name!r} holds NaN or inf. The store is "
            "damaged or was collected from a broken model; collect it again."
        )
