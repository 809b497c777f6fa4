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

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.files import atomic_save_safetensors, atomic_write_text

__all__ = ["collect", "WriteStore", "StoreSource"]

Kind = Literal["state", "write"]
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


def collect(
    model: Any,
    tokens: Int[Tensor, "n_seq pos"] | Iterable[Int[Tensor, "batch pos"]],
    *,
    layers: Sequence[int],
    heads: Sequence[int] | None = None,
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
) -> WriteStore:
    """Capture states or writes of some (layer, head) cells into a sharded store.

    Args:
        model: A `HookedRecurrentModel`.
        tokens: ``[n_seq, pos]`` token ids (or an iterable of such batches).
        layers: Matrix-recurrent layers to capture.
        heads: Heads to capture (default: all).
        kind: ``"state"`` (``S_t`` after each write, the paper's input) or ``"write"`` (the native
            write as its factor pair ``(k_t, u_t)``).
        out_dir: Directory of the store (created; must not hold another store).
        attention_mask: 0 marks padding, which is never captured.
        positions_per_sequence: Keep this many random positions per sequence (seeded), or all.
        skip_first: Ignore the first positions of each sequence (short-context states).
        batch_size: Sequences per forward pass.
        shard_size: Samples per shard file.
        val_fraction: Fraction of sequences held out for validation.
        seed: Seed of the split and of the position subsampling.
        dtype: Dtype on disk.
        center: Also store the mean training sample of each cell (paper §2.1 mean-centering).
        verbose: Show a progress bar.

    Returns:
        The opened `WriteStore`.
    """
    cfg = model.cfg
    heads = list(range(cfg.n_heads)) if heads is None else list(heads)
    for layer in layers:
        if layer not in cfg.recurrent_layers:
            raise ValueError(f"layer {layer} is not matrix-recurrent; recurrent layers: {cfg.recurrent_layers}")
    for head in heads:
        if not 0 <= head < cfg.n_heads:
            raise ValueError(f"head {head} is out of range: the model has {cfg.n_heads} heads per layer")
    out = Path(out_dir)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out} already holds a store; choose a new directory (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)

    batches = _batches(tokens, attention_mask, batch_size)
    n_seq_known = tokens.shape[0] if isinstance(tokens, Tensor) else None
    buffers: dict[tuple[str, int, int], _Buffer] = {}
    sums: dict[tuple[int, int], Tensor] = {}
    counts = {"train": 0, "val": 0}
    generator = torch.Generator().manual_seed(seed)
    sequence_offset = 0
    progress = tqdm(total=n_seq_known, disable=not verbose, desc=f"collecting {kind}s", unit="seq")

    names: list[str] = []
    for layer in layers:
        if kind == "state":
            names += [cfg.hook_name(layer, f"heads.{h}.hook_state") for h in heads]
        else:
            names += [cfg.hook_name(layer, "hook_write_key"), cfg.hook_name(layer, "hook_write_value")]

    for batch_tokens, batch_mask in batches:
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
        keep = _kept_positions(batch_mask, batch_tokens.shape, positions_per_sequence, skip_first, generator)
        seq_index, pos_index = keep.nonzero(as_tuple=True)
        for layer in layers:
            for head in heads:
                if kind == "state":
                    samples = {"states": acts[cfg.hook_name(layer, f"heads.{head}.hook_state")][seq_index, pos_index]}
                else:
                    samples = {
                        "keys": acts[cfg.hook_name(layer, "hook_write_key")][seq_index, pos_index, head],
                        "values": acts[cfg.hook_name(layer, "hook_write_value")][seq_index, pos_index, head],
                    }
                samples["sequence"] = sequence_ids[seq_index.cpu()]
                samples["position"] = pos_index.cpu()
                val_rows = is_val[seq_index.cpu()]
                for split, rows in (("train", ~val_rows), ("val", val_rows)):
                    part = {k: v[rows.to(v.device)].detach().cpu() for k, v in samples.items()}
                    part = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in part.items()}
                    if split == "train" and center:
                        _accumulate_mean(sums, (layer, head), part, kind)
                    buffer = buffers.setdefault((split, layer, head), _Buffer([]))
                    buffer.parts.append(part)
                    buffer.count += len(part["sequence"])
                    while buffer.count >= shard_size:
                        _flush(out, split, layer, head, buffer, shard_size)
        counts["train"] += int((~is_val).sum())
        counts["val"] += int(is_val.sum())
        progress.update(n)
    progress.close()
    for (split, layer, head), buffer in buffers.items():
        while buffer.count:
            _flush(out, split, layer, head, buffer, shard_size)

    cells = {}
    for (split, layer, head), buffer in buffers.items():
        cell = cells.setdefault(_cell(layer, head), {"layer": layer, "head": head})
        cell[split] = {"shards": buffer.shards, "samples": buffer.written}
    if center:
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
        "dtype": str(dtype).removeprefix("torch."),
        "sequences": counts,
        "positions_per_sequence": positions_per_sequence,
        "skip_first": skip_first,
        "val_fraction": val_fraction,
        "seed": seed,
        "centered": center,
        "cells": cells,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return WriteStore(out)


def _accumulate_mean(sums: dict, key: tuple[int, int], part: dict[str, Tensor], kind: Kind) -> None:
    if kind == "state":
        total = part["states"].double().sum(0)
    else:
        total = part["keys"].double().T @ part["values"].double()
    old = sums.get(key)
    count = len(part["sequence"])
    sums[key] = (total, count) if old is None else (old[0] + total, old[1] + count)


def _flush(out: Path, split: str, layer: int, head: int, buffer: _Buffer, shard_size: int) -> None:
    merged = {k: torch.cat([p[k] for p in buffer.parts]) for k in buffer.parts[0]}
    take = min(shard_size, buffer.count)
    shard = {k: v[:take] for k, v in merged.items()}
    rest = {k: v[take:] for k, v in merged.items()}
    atomic_save_safetensors(shard, out / split / _cell(layer, head) / f"shard_{buffer.shards:05d}.safetensors")
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
    generator: torch.Generator,
) -> Tensor:
    keep = torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
    keep[:, :skip_first] = False
    if per_sequence is not None:
        scores = torch.rand(shape, generator=generator).masked_fill(~keep, -1.0)
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
        return self.manifest["hook_names"][str(layer)]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    def _shards(self, layer: int, head: int, split: str) -> list[Path]:
        cell = _cell(layer, head)
        if cell not in self.manifest["cells"]:
            have = ", ".join(self.manifest["cells"])
            raise KeyError(f"the store has no layer {layer} head {head}; it has {have}")
        if split not in ("train", "val"):
            raise ValueError("split is 'train' or 'val'")
        return sorted((self.path / split / cell).glob("shard_*.safetensors"))

    def num_samples(self, layer: int, head: int, split: str = "train") -> int:
        return self.manifest["cells"][_cell(layer, head)].get(split, {}).get("samples", 0)

    def mean(self, layer: int, head: int) -> Float[Tensor, "d_k d_v"]:
        """The mean training sample of a cell (stored when collected with ``center=True``)."""
        path = self.path / "mean.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{self.path} was collected without center=True; it has no mean")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(_cell(layer, head))

    def read(self, layer: int, head: int, split: str = "train") -> dict[str, Tensor]:
        """Every sample of a cell, in storage order (small stores; large ones stream via `source`)."""
        parts = [_load(shard) for shard in self._shards(layer, head, split)]
        if not parts:
            return {}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def source(
        self, layer: int, head: int, split: str = "train", *, shuffle: bool = True, seed: int | None = None,
        buffer_shards: int = 4,
    ) -> StoreSource:
        """A training source (``num_samples`` + ``batches(epoch, batch_size, start)``) over a cell."""
        return StoreSource(
            self._shards(layer, head, split),
            self.num_samples(layer, head, split),
            kind=self.kind,
            shuffle=shuffle,
            seed=self.manifest["seed"] if seed is None else seed,
            buffer_shards=buffer_shards,
        )

    def bytes_per_sample(self, layer: int, head: int, split: str = "train") -> float:
        """Bytes on disk per captured token of one head (shard files included)."""
        shards = self._shards(layer, head, split)
        return sum(s.stat().st_size for s in shards) / max(1, self.num_samples(layer, head, split))


def _load(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise OSError(f"cannot read store shard {path}: {err}. The file is damaged; re-run collect().") from err


class StoreSource:
    """Streams a cell's shards: a few shards at a time, shuffled within them, in a seeded order.

    The order of an epoch depends only on ``(seed, epoch)``, so resuming training at batch
    ``start`` sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self, shards: list[Path], num_samples: int, *, kind: Kind, shuffle: bool, seed: int, buffer_shards: int
    ) -> None:
        self.shards, self._num_samples, self.kind = shards, num_samples, kind
        self.shuffle, self.seed, self.buffer_shards = shuffle, seed, max(1, buffer_shards)

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def _generator(self, epoch: int, group: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1_009 + group)

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=self._generator(epoch, -1)).tolist()
        index = 0
        carry: dict[str, Tensor] | None = None
        for group_start in range(0, len(order), self.buffer_shards):
            group = [_load(self.shards[i]) for i in order[group_start : group_start + self.buffer_shards]]
            pool = {k: torch.cat([g[k] for g in group]) for k in group[0]}
            if self.shuffle:
                perm = torch.randperm(len(pool["sequence"]), generator=self._generator(epoch, group_start))
                pool = {k: v[perm] for k, v in pool.items()}
            if carry is not None:
                pool = {k: torch.cat([carry[k], pool[k]]) for k in pool}
            n = len(pool["sequence"])
            full = n - n % batch_size
            for begin in range(0, full, batch_size):
                if index >= start:
                    yield self._batch(pool, begin, begin + batch_size)
                index += 1
            carry = {k: v[full:] for k, v in pool.items()} if full < n else None
        if carry is not None and index >= start:
            yield self._batch(carry, 0, len(carry["sequence"]))

    def _batch(self, pool: dict[str, Tensor], a: int, b: int) -> Tensor | tuple[Tensor, Tensor]:
        if self.kind == "state":
            return pool["states"][a:b]
        return pool["keys"][a:b], pool["values"][a:b]
