"""WriteStore: states or writes captured from a hooked model, sharded on disk, streamed to training.

`collect` runs a `HookedRecurrentModel` over token sequences and keeps, for chosen layers and
heads, either the per-position states ``S_t`` (the paper's training input, ``d_k * d_v`` numbers
per head per token) or the native writes as factor pairs ``(k_t, u_t)`` (``d_k + d_v`` numbers).
Samples go to safetensors shards under one directory, so a store can exceed memory; every sample
remembers its sequence and position, so firings found later can be traced back to their tokens.

Layout::

    store/
      manifest.json                      what was captured, from which model, how it was split
      train/L{l}_H{h}/shard_00000.safetensors   "states" [n, d_k, d_v]  or  "keys" [n, d_k] + "values" [n, d_v]
                                                 + "sequence" [n] and "position" [n] (int64)
      val/L{l}_H{h}/...
      mean.safetensors                   per-cell mean of the training samples (when center=True)

Train/validation is split by sequence (no position of a validation sequence is ever trained on),
with a seeded permutation. Each shard and the manifest are written atomically.

Example:
    >>> import torch, tempfile
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")
    >>> tokens = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    >>> store = collect(model, tokens, layers=[1], heads=[2], kind="write", out_dir=tempfile.mkdtemp(), verbose=False)
    >>> store.num_samples(1, 2, "train") + store.num_samples(1, 2, "val")
    256
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.files import atomic_dir, atomic_save_safetensors, atomic_write_text

from writesae.distributed import World, all_gather_objects, on_main, rank_range
from writesae.outputs import OutputMode, prepare_output_dir
from writesae.shards import CellRows
from writesae.streaming import Kind, StoreSource

__all__ = ["collect", "WriteStore", "StoreSource"]

_FORMAT = "writesae.WriteStore/1"


def _cell(layer: int, head: int) -> str:
    return f"L{layer}_H{head}"


@dataclass
class _Buffer:
    """Samples of one (split, layer, head) waiting to be written."""

    parts: list[dict[str, Tensor]]
    count: int = 0  # waiting
    shards: int = 0
    written: int = 0


_CHECKPOINT = "collect_checkpoint"
_CHECKPOINT_STATE = "state.json"
_CHECKPOINT_TENSORS = "pending.safetensors"


def collect(
    model: Any,
    tokens: Int[Tensor, "n_seq pos"] | Iterable[Int[Tensor, "batch pos"]],
    *,
    layers: Sequence[int] | int,
    heads: Sequence[int] | int | None = None,
    kind: Kind = "state",
    out_dir: str | os.PathLike,
    attention_mask: Int[Tensor, "n_seq pos"] | None = None,
    positions_per_sequence: int | None = None,
    skip_first: int = 0,
    batch_size: int = 8,
    shard_size: int = 65536,
    val_fraction: float = 0.2,
    seed: int = 42,
    dtype: torch.dtype = torch.float32,
    center: bool = False,
    verbose: bool = True,
    mode: OutputMode = "new",
    checkpoint_every: int = 16,
    world: World | None = None,
) -> WriteStore:
    """Capture states or writes of some (layer, head) cells into a sharded store.

    Collection is resumable: every ``checkpoint_every`` batches the progress (samples not yet in a
    shard, the running means) is saved atomically under ``out_dir/collect_checkpoint/``;
    ``mode="resume"`` with the same arguments continues from there and ends with the store an
    uninterrupted run writes, shard for shard.

    Data-parallel under ``torchrun``: each rank runs its own model copy over a contiguous share of
    the batches and writes its own shards (``rank00003_shard_00000.safetensors``); rank 0 gathers
    what every rank wrote and writes the one manifest, which lists the shards in sequence order.
    The split and the kept positions are seeded per sequence, and every batch is the batch a single
    process would run, so the store holds, sample for sample, what one process would write.

    Args:
        model: A `HookedRecurrentModel`.
        tokens: ``[n_seq, pos]`` token ids (or an iterable of such batches, the same on a resume).
        layers: Matrix-recurrent layers to capture.
        heads: Heads to capture (default: all).
        kind: ``"state"`` (``S_t`` after each write, the paper's input) or ``"write"`` (the native
            write as its factor pair ``(k_t, u_t)``).
        out_dir: Directory of the store.
        attention_mask: 0 marks padding, which is never captured.
        positions_per_sequence: Keep this many random positions per sequence (seeded), or all.
        skip_first: Ignore the first positions of each sequence (short-context states).
        batch_size: Sequences per forward pass.
        shard_size: Samples per shard file.
        val_fraction: Fraction of sequences held out for validation, in (0, 1).
        seed: Seed of the split and of the position subsampling.
        dtype: Floating dtype on disk (``float32``, ``bfloat16``, ``float16``, ``float64``); values
            it cannot hold (an overflow of float16) are refused, not rounded to inf.
        center: Also store the mean training sample of each cell (paper §2.1 mean-centering).
        verbose: Show a progress bar.
        mode: ``"new"`` (refuse a folder holding files), ``"resume"`` or ``"overwrite"``; see
            `writesae.outputs.prepare_output_dir`.
        checkpoint_every: Save the progress every this many batches.
        world: The processes sharing the work (default: from ``torchrun``'s environment; under
            ``torchrun`` call this inside `writesae.distributed.process_group`). Data-parallel
            collection needs ``tokens`` as one tensor.

    Returns:
        The opened `WriteStore`.

    Raises:
        ValueError: an argument out of range, non-finite activations, or a split with no sequence.
        OutputExistsError: ``out_dir`` holds files and ``mode="new"``.
    """
    cfg = model.cfg
    layers = [layers] if isinstance(layers, int) else list(layers)
    heads = list(range(cfg.n_heads)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    settings = _check_collect_args(cfg, tokens, layers, heads, kind, positions_per_sequence, skip_first, batch_size,
                                   shard_size, val_fraction, seed, dtype, checkpoint_every)  # fmt: skip
    world = _collect_world(world, tokens)
    settings.update(kind=kind, positions_per_sequence=positions_per_sequence, skip_first=skip_first,
                    batch_size=batch_size, shard_size=shard_size, val_fraction=val_fraction, seed=seed, center=center,
                    model=cfg.model_name, world_size=world.world_size)  # fmt: skip
    out = on_main(lambda: prepare_output_dir(out_dir, mode, what="store"), world)
    if mode == "resume" and (out / "manifest.json").exists():
        store = WriteStore(out)
        _check_same_settings(store.manifest.get("settings", {}), settings, out / "manifest.json")
        return store

    # This rank's batches: a contiguous share, cut at the batch boundaries a single process uses.
    n_batches = -(-tokens.shape[0] // batch_size) if isinstance(tokens, Tensor) else None
    first, last = rank_range(n_batches, world.rank, world.world_size) if world.distributed else (0, n_batches)
    prefix = f"rank{world.rank:05d}_" if world.distributed else ""
    buffers: dict[tuple[str, int, int], _Buffer] = {}
    sums: dict[tuple[int, int], tuple[Tensor, int]] = {}
    counts = {"train": 0, "val": 0}
    done = {"batches": 0, "sequences": first * batch_size}
    if mode == "resume":
        _restore(out, settings, buffers, sums, counts, done, world, prefix)
    sequence_offset = done["sequences"]
    n_mine = None if n_batches is None else min(last * batch_size, tokens.shape[0]) - first * batch_size
    desc = f"collecting {kind}s" + (f" (rank {world.rank})" if world.distributed else "")
    with tqdm(total=n_mine, initial=sequence_offset - first * batch_size, disable=not verbose, desc=desc, unit="seq") as progress:
        names: list[str] = []
        for layer in layers:
            if kind == "state":
                names += [cfg.hook_name(layer, f"heads.{h}.hook_state") for h in heads]
            else:
                names += [cfg.hook_name(layer, "hook_write_key"), cfg.hook_name(layer, "hook_write_value")]

        batches = _batches(tokens, attention_mask, batch_size)
        for batch_tokens, batch_mask in itertools.islice(batches, first + done["batches"], last):
            n = batch_tokens.shape[0]
            sequence_ids = torch.arange(sequence_offset, sequence_offset + n)
            sequence_offset += n
            is_val = _is_validation(sequence_ids, val_fraction, seed)
            with torch.no_grad():
                _, acts = model.run_with_cache(
                    batch_tokens,
                    attention_mask=batch_mask,
                    names_filter=names,
                    stop_at_layer=max(layers) + 1,
                    return_cache_object=False,
                )
            keep = _kept_positions(batch_mask, batch_tokens.shape, positions_per_sequence, skip_first, sequence_ids, seed)
            seq_index, pos_index = keep.nonzero(as_tuple=True)
            on_model = seq_index.to(batch_tokens.device), pos_index.to(batch_tokens.device)
            for layer in layers:
                for head in heads:
                    # One copy of the kept rows to the host per cell; every later step runs on the CPU.
                    if kind == "state":
                        samples = {"states": acts[cfg.hook_name(layer, f"heads.{head}.hook_state")][on_model].cpu()}
                    else:
                        samples = {
                            "keys": acts[cfg.hook_name(layer, "hook_write_key")][(*on_model, head)].cpu(),
                            "values": acts[cfg.hook_name(layer, "hook_write_value")][(*on_model, head)].cpu(),
                        }
                    samples["sequence"] = sequence_ids[seq_index]
                    samples["position"] = pos_index
                    _check_samples(samples, dtype, layer, head)
                    val_rows = is_val[seq_index]
                    for split, rows in (("train", ~val_rows), ("val", val_rows)):
                        part = {k: (v[rows].to(dtype) if v.is_floating_point() else v[rows]) for k, v in samples.items()}
                        if split == "train" and center:
                            _accumulate_mean(sums, (layer, head), part, kind)
                        buffer = buffers.setdefault((split, layer, head), _Buffer([]))
                        buffer.parts.append(part)
                        buffer.count += len(part["sequence"])
                        while buffer.count >= shard_size:
                            _flush(out, split, layer, head, buffer, shard_size, prefix)
            counts["train"] += int((~is_val).sum())
            counts["val"] += int(is_val.sum())
            done["batches"] += 1
            done["sequences"] = sequence_offset
            progress.update(n)
            if done["batches"] % checkpoint_every == 0:
                _save_progress(_checkpoint_dir(out, world), settings, buffers, sums, counts, done)
    # Each rank's share, in rank order = sequence order: counts, shard files, sums for the means.
    shares = all_gather_objects({"counts": counts, "sums": sums, "files": _finish_shards(out, buffers, shard_size, prefix)}, world)
    total = {split: sum(share["counts"][split] for share in shares) for split in ("train", "val")}
    for split in ("train", "val"):
        if total[split] == 0:
            raise ValueError(
                f"the {split} split holds no sequence ({sum(total.values())} sequence(s), val_fraction={val_fraction}); "
                "collect more sequences or change val_fraction"
            )
    write = lambda: _write_manifest(out, cfg, settings, shares)  # noqa: E731
    on_main(write, world)
    return WriteStore(out)


def _collect_world(world: World | None, tokens: Any) -> World:
    world = World.from_env() if world is None else world
    if world.distributed and not dist.is_initialized():
        raise RuntimeError(
            f"collect runs as rank {world.rank} of {world.world_size} but no process group exists; "
            "call it inside `with writesae.distributed.process_group(device):`"
        )
    if world.distributed and not isinstance(tokens, Tensor):
        raise ValueError(
            "data-parallel collection splits the token blocks between ranks by their index: pass tokens as one "
            "[n_seq, pos] tensor, not an iterable of batches"
        )
    return world


def _checkpoint_dir(out: Path, world: World) -> Path:
    return out / _CHECKPOINT / f"rank{world.rank:05d}" if world.distributed else out / _CHECKPOINT


def _finish_shards(out: Path, buffers: dict, shard_size: int, prefix: str) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Write what the buffers still hold; returns each (split, layer, head)'s shard files and sample count."""
    files = {}
    for (split, layer, head), buffer in buffers.items():
        while buffer.count:
            _flush(out, split, layer, head, buffer, shard_size, prefix)
        names = [_shard_name(prefix, i) for i in range(buffer.shards)]
        files[(split, layer, head)] = {"files": names, "samples": buffer.written}
    return files


def _write_manifest(out: Path, cfg: Any, settings: dict[str, Any], shares: list[dict[str, Any]]) -> None:
    """The one manifest (and the means), from every rank's share in rank order; removes the checkpoints."""
    layers, heads, kind = settings["layers"], settings["heads"], settings["kind"]
    counts = {split: sum(share["counts"][split] for share in shares) for split in ("train", "val")}
    cells: dict[str, dict[str, Any]] = {}
    for share in shares:
        for (split, layer, head), written in share["files"].items():
            cell = cells.setdefault(_cell(layer, head), {"layer": layer, "head": head})
            entry = cell.setdefault(split, {"shards": 0, "samples": 0, "files": []})
            entry["files"] += written["files"]
            entry["shards"] += len(written["files"])
            entry["samples"] += written["samples"]
    if settings["center"]:
        sums: dict[tuple[int, int], tuple[Tensor, int]] = {}
        for share in shares:
            for key, (total, count) in share["sums"].items():
                old = sums.get(key)
                sums[key] = (total, count) if old is None else (old[0] + total, old[1] + count)
        atomic_save_safetensors({f"{_cell(*cell)}": total / count for cell, (total, count) in sums.items()}, out / "mean.safetensors")
    manifest = {
        "format": _FORMAT,
        "kind": kind,
        "model": {
            "name": cfg.model_name,
            "architecture": cfg.architecture,
            "d_k": cfg.d_k,
            "d_v": cfg.d_v,
            "n_heads": cfg.n_heads,
        },
        "hook": "hook_state" if kind == "state" else "hook_write",
        "hook_names": {
            str(layer): cfg.hook_name(layer, "hook_state" if kind == "state" else "hook_write") for layer in layers
        },
        "layers": list(layers),
        "heads": heads,
        "dtype": settings["dtype"],
        "sequences": counts,
        "positions_per_sequence": settings["positions_per_sequence"],
        "skip_first": settings["skip_first"],
        "val_fraction": settings["val_fraction"],
        "seed": settings["seed"],
        "centered": settings["center"],
        "cells": cells,
        "settings": settings,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    shutil.rmtree(out / _CHECKPOINT, ignore_errors=True)


def _check_collect_args(
    cfg: Any, tokens: Any, layers: list[int], heads: list[int], kind: str, positions_per_sequence: int | None,
    skip_first: int, batch_size: int, shard_size: int, val_fraction: float, seed: int, dtype: torch.dtype,
    checkpoint_every: int,
) -> dict[str, Any]:
    """Refuse arguments that would give an empty, wrong or unreadable store; returns the settings
    a resumed collection must share."""
    if not layers:
        raise ValueError(f"layers=[] captures nothing; give matrix-recurrent layers from {cfg.recurrent_layers}")
    for layer in layers:
        if layer not in cfg.recurrent_layers:
            raise ValueError(f"layer {layer} is not matrix-recurrent; recurrent layers: {cfg.recurrent_layers}")
    if not heads:
        raise ValueError(f"heads=[] captures nothing; give heads in 0..{cfg.n_heads - 1}, or None for all")
    for head in heads:
        if not 0 <= head < cfg.n_heads:
            raise ValueError(f"head {head} is out of range: the model has {cfg.n_heads} heads per layer (0..{cfg.n_heads - 1})")
    for name, values in (("layers", layers), ("heads", heads)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name}={values} repeats an entry; give each once")
    if kind not in ("state", "write"):
        raise ValueError(f"kind={kind!r}: give 'state' or 'write'")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("checkpoint_every", checkpoint_every),
                        ("positions_per_sequence", positions_per_sequence)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: give a whole number >= 1")
    if not isinstance(skip_first, int) or skip_first < 0:
        raise ValueError(f"skip_first={skip_first!r}: give a whole number >= 0")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: give a fraction in (0, 1), e.g. 0.2")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"dtype={dtype}: a store holds real-valued states, which an integer dtype would round to zero; "
            "use torch.float32 (or bfloat16/float16 to halve the size)"
        )
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; give [n_seq, pos] with n_seq >= 1 and pos >= 1")
        if skip_first >= tokens.shape[1]:
            raise ValueError(
                f"skip_first={skip_first} skips every position of sequences of {tokens.shape[1]} tokens; "
                f"give skip_first < {tokens.shape[1]}"
            )
        n_val = int(_is_validation(torch.arange(tokens.shape[0]), val_fraction, seed).sum())
        if n_val in (0, tokens.shape[0]):
            split = "val" if n_val == 0 else "train"
            raise ValueError(
                f"the {split} split would hold no sequence ({tokens.shape[0]} sequence(s), val_fraction={val_fraction}); "
                "collect more sequences or change val_fraction"
            )
    return {"layers": layers, "heads": heads, "dtype": str(dtype).removeprefix("torch."),
            "n_sequences": tokens.shape[0] if isinstance(tokens, Tensor) else None}  # fmt: skip


def _check_same_settings(saved: dict[str, Any], settings: dict[str, Any], where: Path) -> None:
    for key, value in settings.items():
        if saved.get(key) != value:
            raise ValueError(
                f"{where}: the store being resumed was collected with {key}={saved.get(key)!r}, this call has "
                f"{value!r}; resume with the same arguments, or pass --overwrite (mode='overwrite') to start anew"
            )


def _check_samples(samples: dict[str, Tensor], dtype: torch.dtype, layer: int, head: int) -> None:
    """Refuse non-finite activations, and values the store's dtype would turn into inf."""
    for name, values in samples.items():
        if not values.is_floating_point():
            continue
        finite = torch.isfinite(values).flatten(1).all(1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise ValueError(
                f"L{layer} H{head}: the model produced non-finite {name} at sequence {int(samples['sequence'][row])}, "
                f"position {int(samples['position'][row])}; check the model's weights and dtype (float32 is safest)"
            )
        largest = float(values.abs().max()) if values.numel() else 0.0
        if largest > torch.finfo(dtype).max:
            raise ValueError(
                f"L{layer} H{head}: {name} reach {largest:.3g}, beyond the largest {dtype} ({torch.finfo(dtype).max:.3g}); "
                "collect with dtype=torch.float32 or torch.bfloat16 (--store-dtype float32)"
            )


def _save_progress(checkpoint: Path, settings: dict[str, Any], buffers: dict, sums: dict, counts: dict, done: dict) -> None:
    """Atomically save what a resumed collection needs (the shards on disk are already final)."""
    tensors: dict[str, Tensor] = {}
    buffer_state = []
    for (split, layer, head), buffer in buffers.items():
        buffer_state.append({"split": split, "layer": layer, "head": head, "count": buffer.count,
                             "shards": buffer.shards, "written": buffer.written})  # fmt: skip
        if buffer.count:
            for key in buffer.parts[0]:
                tensors[f"pending/{split}/{layer}/{head}/{key}"] = torch.cat([p[key] for p in buffer.parts])
    sum_state = []
    for (layer, head), (total, count) in sums.items():
        tensors[f"sum/{layer}/{head}"] = total
        sum_state.append({"layer": layer, "head": head, "count": count})
    state = {"settings": settings, "done": done, "counts": counts, "buffers": buffer_state, "sums": sum_state}

    def write(directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / _CHECKPOINT_TENSORS))
        (directory / _CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))

    atomic_dir(checkpoint, write)


def _restore(out: Path, settings: dict[str, Any], buffers: dict, sums: dict, counts: dict, done: dict, world: World,
             prefix: str) -> None:  # fmt: skip
    """Load this rank's last progress checkpoint (none: start from the beginning) and drop the
    shards it wrote after it."""
    checkpoint = _checkpoint_dir(out, world)
    state = None
    if (checkpoint / _CHECKPOINT_STATE).exists():
        state = json.loads((checkpoint / _CHECKPOINT_STATE).read_text())
        _check_same_settings(state["settings"], settings, checkpoint / _CHECKPOINT_STATE)
        tensors = _load(checkpoint / _CHECKPOINT_TENSORS)
        done.update(state["done"])
        counts.update(state["counts"])
        for entry in state["buffers"]:
            split, layer, head = entry["split"], entry["layer"], entry["head"]
            prefix = f"pending/{split}/{layer}/{head}/"
            parts = [{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}] if entry["count"] else []
            buffers[(split, layer, head)] = _Buffer(parts, entry["count"], entry["shards"], entry["written"])
        for entry in state["sums"]:
            sums[(entry["layer"], entry["head"])] = (tensors[f"sum/{entry['layer']}/{entry['head']}"], entry["count"])
    for split in ("train", "val"):
        for cell_dir in (out / split).glob("L*_H*"):
            layer, head = (int(x[1:]) for x in cell_dir.name.split("_"))
            buffer = buffers.get((split, layer, head))
            for shard in cell_dir.glob(f"{prefix}shard_*.safetensors"):
                if buffer is None or int(shard.stem.rsplit("_", 1)[1]) >= buffer.shards:
                    shard.unlink()  # written after the checkpoint: the resumed run writes it again


def _accumulate_mean(sums: dict, key: tuple[int, int], part: dict[str, Tensor], kind: Kind) -> None:
    if kind == "state":
        total = part["states"].double().sum(0)
    else:
        total = part["keys"].double().T @ part["values"].double()
    old = sums.get(key)
    count = len(part["sequence"])
    sums[key] = (total, count) if old is None else (old[0] + total, old[1] + count)


def _shard_name(prefix: str, index: int) -> str:
    """``shard_00007.safetensors``; a rank of a data-parallel collection prefixes ``rank00002_``."""
    return f"{prefix}shard_{index:05d}.safetensors"


def _flush(out: Path, split: str, layer: int, head: int, buffer: _Buffer, shard_size: int, prefix: str) -> None:
    merged = {k: torch.cat([p[k] for p in buffer.parts]) for k in buffer.parts[0]}
    take = min(shard_size, buffer.count)
    shard = {k: v[:take] for k, v in merged.items()}
    rest = {k: v[take:] for k, v in merged.items()}
    atomic_save_safetensors(shard, out / split / _cell(layer, head) / _shard_name(prefix, buffer.shards))
    buffer.shards += 1
    buffer.written += take
    buffer.count -= take
    buffer.parts = [rest] if buffer.count else []


def _batches(
    tokens: Tensor | Iterable[Tensor], mask: Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    if isinstance(tokens, Tensor):
        for start in range(0, tokens.shape[0], batch_size):
            yield tokens[start : start + batch_size], None if mask is None else mask[start : start + batch_size]
    else:
        for batch in tokens:
            if isinstance(batch, (tuple, list)):
                yield batch[0], batch[1]
            else:
                yield batch, None


def _is_validation(sequence_ids: Tensor, val_fraction: float, seed: int) -> Tensor:
    """Seeded, per-sequence assignment to validation (the same whatever the batching)."""
    draws = [random.Random(f"{seed}:{int(s)}").random() for s in sequence_ids]
    return torch.tensor(draws) < val_fraction


def _kept_positions(
    mask: Tensor | None,
    shape: torch.Size,
    per_sequence: int | None,
    skip_first: int,
    sequence_ids: Tensor,
    seed: int,
) -> Tensor:
    """Positions to capture (CPU): unpadded, past ``skip_first``, and ``per_sequence`` of them drawn
    with a generator seeded per sequence (the same whatever the batching or the rank)."""
    keep = torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
    keep[:, :skip_first] = False
    if per_sequence is not None:
        seeds = [random.Random(f"positions:{seed}:{int(s)}").getrandbits(63) for s in sequence_ids]
        scores = torch.stack([torch.rand(shape[1], generator=torch.Generator().manual_seed(g)) for g in seeds])
        scores = scores.masked_fill(~keep, -1.0)
        top = scores.topk(min(per_sequence, shape[1]), dim=1).indices
        chosen = torch.zeros_like(keep)
        chosen.scatter_(1, top, True)
        keep &= chosen
    return keep


class WriteStore:
    """A store written by `collect`.

    Args:
        path: Its directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"{self.path} is not a WriteStore (no manifest.json); create one with collect()")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != _FORMAT:
            raise ValueError(f"{manifest} is not a {_FORMAT} manifest")

    @property
    def kind(self) -> Kind:
        return self.manifest["kind"]

    def hook_name(self, layer: int) -> str:
        """The model hook point the samples of a layer came from (``...hook_state`` / ``...hook_write``)."""
        if str(layer) not in self.manifest["hook_names"]:
            raise KeyError(f"the store {self.path} has no layer {layer}; it has layers {self.manifest['layers']}")
        return self.manifest["hook_names"][str(layer)]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    def _cell_entry(self, layer: int, head: int, split: str) -> dict[str, Any]:
        cell = _cell(layer, head)
        if cell not in self.manifest["cells"]:
            have = ", ".join(self.manifest["cells"])
            raise KeyError(f"the store {self.path} has no layer {layer} head {head}; it has {have}")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: give 'train' or 'val'")
        return self.manifest["cells"][cell]

    def _shards(self, layer: int, head: int, split: str) -> list[Path]:
        """The cell's shard files in sample order (as the manifest lists them; older stores: by name)."""
        folder = self.path / split / _cell(layer, head)
        files = self._cell_entry(layer, head, split).get(split, {}).get("files")
        if files is None:
            return sorted(folder.glob("shard_*.safetensors"))
        return [folder / name for name in files]

    def num_samples(self, layer: int, head: int, split: str = "train") -> int:
        return self._cell_entry(layer, head, split).get(split, {}).get("samples", 0)

    def mean(self, layer: int, head: int) -> Float[Tensor, "d_k d_v"]:
        """The mean training sample of a cell (stored when collected with ``center=True``)."""
        path = self.path / "mean.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{self.path} was collected without center=True; it has no mean")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(_cell(layer, head))

    def rows(self, layer: int, head: int, split: str = "train") -> CellRows:
        """A cell's samples as one memory-mapped array of rows (`writesae.shards.CellRows`)."""
        return CellRows(self._shards(layer, head, split))

    def read(self, layer: int, head: int, split: str = "train") -> dict[str, Tensor]:
        """Every sample of a cell, in storage order (small stores; large ones stream via `source`)."""
        rows = self.rows(layer, head, split)
        return rows.gather(torch.arange(rows.num_rows)) if rows.shards else {}

    def source(
        self,
        layer: int,
        head: int,
        split: str = "train",
        *,
        shuffle: bool = True,
        seed: int | None = None,
        block_size: int = 256,
        window_blocks: int = 64,
        pin_memory: bool = False,
    ) -> StoreSource:
        """A training source over a cell, streamed from memory-mapped shards (`writesae.streaming`).

        Args:
            layer: Layer of the cell.
            head: Head of the cell.
            split: ``"train"`` or ``"val"``.
            shuffle: Block-shuffle the samples every epoch (off for validation).
            seed: Seed of the order (default: the store's seed).
            block_size: Consecutive samples read together.
            window_blocks: Blocks shuffled together; memory stays near ``block_size * window_blocks`` samples.
            pin_memory: Page-locked batches, for asynchronous copies to a GPU.
        """
        return StoreSource(
            self.rows(layer, head, split),
            kind=self.kind,
            shuffle=shuffle,
            seed=self.manifest["seed"] if seed is None else seed,
            block_size=block_size,
            window_blocks=window_blocks,
            pin_memory=pin_memory,
        )

    def bytes_per_sample(self, layer: int, head: int, split: str = "train") -> float:
        """Bytes on disk per captured token of one head (shard files included)."""
        shards = self._shards(layer, head, split)
        return sum(s.stat().st_size for s in shards) / max(1, self.num_samples(layer, head, split))


def _load(path: Path) -> dict[str, Tensor]:
    """A shard's tensors; a damaged file or a non-finite sample is refused, naming the shard and row."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise OSError(f"cannot read store shard {path}: {err}. The file is damaged; re-run collect().") from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dim() > 0:
            finite = torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(1)
            if not bool(finite.all()):
                row = int((~finite).nonzero()[0])
                where = ""
                if "sequence" in tensors:
                    where = f" (sequence {int(tensors['sequence'][row])}, position {int(tensors['position'][row])})"
                raise ValueError(
                    f"store shard {path}: row {row}{where} of {name!r} holds NaN or inf. The store is damaged or "
                    "was collected from a broken model; collect it again."
                )
    return tensors
