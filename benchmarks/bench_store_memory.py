"""Peak resident memory of training on a store cell, against the store's size: streamed vs in memory.

For each store size, a store cell of synthetic states is written to disk, and one epoch of
WriteSAE training runs over it in a fresh process, twice:

- streamed: ``WriteStore.source``'s reader (`writesae.streaming.StoreSource`: memory-mapped shards,
  block-shuffled windows, mapped pages released as they are copied);
- in memory (the baseline): the whole cell read into a tensor first (``WriteStore.read``), then
  trained from a ``TensorSource``.

What is measured, and why this is an honest stand-in for a RAM cap: Linux cannot cap one process's
resident memory without cgroups (``RLIMIT_RSS`` is ignored; ``RLIMIT_AS`` counts address space, so
it would refuse the memory map of a large store although mapping reads nothing). So the run is
*allotted* a RAM budget (``--allot-mib``) and the benchmark measures whether it stays inside it: the
child resets its peak-RSS counter after its imports and setup (``/proc/self/clear_refs``), trains,
and reports ``VmHWM``, the peak resident set. That peak counts everything the process holds
resident: its own (anonymous) memory and every page of a mapped file it has touched and not yet
released. It does not count the kernel's page cache, which is shared, evicted on demand, and where
a store larger than RAM lives between reads. The store sizes go to several times the allotment;
the target is a flat streamed peak, inside the allotment, while the in-memory peak grows with the
store.

Usage: python benchmarks/bench_store_memory.py [--sizes-mib 64 256 1024] [--allot-mib 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hooks import _reset_peak_rss, _status_bytes  # noqa: E402

from hooked_recurrent.files import atomic_save_safetensors  # noqa: E402

MiB = 2**20


def write_cell(directory: Path, size_mib: int, d: int, shard_mib: int, seed: int) -> int:
    """Shards of ``[n, d, d]`` float32 states (unit mean square), ``size_mib`` in all; returns n."""
    row = d * d * 4
    n_total = size_mib * MiB // row
    per_shard = shard_mib * MiB // row
    generator = torch.Generator().manual_seed(seed)
    for i, begin in enumerate(range(0, n_total, per_shard)):
        n = min(per_shard, n_total - begin)
        states = torch.randn(n, d, d, generator=generator) / d
        atomic_save_safetensors(
            {"states": states, "sequence": torch.arange(begin, begin + n), "position": torch.zeros(n, dtype=torch.long)},
            directory / f"shard_{i:05d}.safetensors",
        )
    return n_total


def child(args: argparse.Namespace) -> None:
    """One epoch of training in this process; prints peak RSS above the pre-training level."""
    from writesae import TensorSource, TrainerConfig, WriteSAETrainer, WriteTrainingSAE, WriteTrainingSAEConfig
    from writesae.shards import CellRows
    from writesae.streaming import StoreSource

    torch.set_num_threads(1)
    cell = Path(args.child_cell)
    sae = WriteTrainingSAE(WriteTrainingSAEConfig.build(d_k=args.d, d_v=args.d, d_sae=args.d_sae, k=args.k), seed=0)
    rows_of_window = args.block_size * args.window_blocks
    before = _reset_peak_rss()
    start = time.perf_counter()
    rows = CellRows(sorted(cell.glob("shard_*.safetensors")))
    if args.child == "streamed":
        source = StoreSource(rows, kind="state", seed=0, block_size=args.block_size, window_blocks=args.window_blocks)
    else:
        source = TensorSource(rows.gather(torch.arange(rows.num_rows), names=["states"])["states"], seed=0)
    trainer = WriteSAETrainer(sae, source, TrainerConfig(batch_size=args.batch, epochs=1, progress=False))
    trainer.fit()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "peak_above_start_bytes": _status_bytes("VmHWM") - before,
        "samples": rows.num_rows, "seconds": seconds, "window_bytes": rows_of_window * rows.row_bytes(),
    }))  # fmt: skip


def run_child(mode: str, cell: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--child-cell", str(cell), f"--d={args.d}", f"--d-sae={args.d_sae}",
           f"--k={args.k}", f"--batch={args.batch}", f"--block-size={args.block_size}", f"--window-blocks={args.window_blocks}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024], help="store cell sizes")
    parser.add_argument("--allot-mib", type=int, default=64, help="RAM allotted to reading and training")
    parser.add_argument("--d", type=int, default=16, help="d_k = d_v of the states (a row is 4 d^2 bytes)")
    parser.add_argument("--d-sae", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--window-blocks", type=int, default=64)
    parser.add_argument("--shard-mib", type=int, default=16)
    parser.add_argument("--dir", default=None, help="where the stores are written (default: a temporary folder)")
    parser.add_argument("--child", choices=["streamed", "in_memory"], help=argparse.SUPPRESS)
    parser.add_argument("--child-cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    window_mib = args.block_size * args.window_blocks * args.d * args.d * 4 / MiB
    print(f"torch {torch.__version__}; states {args.d}x{args.d} float32 ({args.d * args.d * 4} B/sample); "
          f"window {args.block_size}x{args.window_blocks} samples = {window_mib:.0f} MiB; allotted {args.allot_mib} MiB")
    print(f"{'store MiB':>10} {'x allot':>8} {'streamed peak MiB':>18} {'in-memory peak MiB':>19} "
          f"{'streamed s':>11} {'in-memory s':>12}")
    streamed_peaks = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in args.sizes_mib:
            cell = Path(tmp) / f"cell_{size}"
            cell.mkdir()
            write_cell(cell, size, args.d, args.shard_mib, seed=size)
            streamed = run_child("streamed", cell, args)
            in_memory = run_child("in_memory", cell, args)
            for shard in cell.iterdir():
                shard.unlink()
            streamed_peaks.append(streamed["peak_above_start_bytes"] / MiB)
            print(f"{size:>10} {size / args.allot_mib:>8.1f} {streamed_peaks[-1]:>18.1f} "
                  f"{in_memory['peak_above_start_bytes'] / MiB:>19.1f} {streamed['seconds']:>11.1f} {in_memory['seconds']:>12.1f}")
    growth = streamed_peaks[-1] / max(streamed_peaks[0], 1e-9)
    inside = max(streamed_peaks) <= args.allot_mib
    print(f"streamed peak, largest store / smallest: {growth:.2f}x over a {args.sizes_mib[-1] / args.sizes_mib[0]:.0f}x "
          f"larger store (target: flat, ~1x); within the {args.allot_mib} MiB allotment: {'yes' if inside else 'NO'}")


if __name__ == "__main__":
    main()
