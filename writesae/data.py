"""Training data for WriteSAE: the source protocol the trainer reads, and in-memory sources.

A batch is either dense states ``[B, d_k, d_v]`` (or flat ``[B, d_k * d_v]``) or rank-1 writes as a
factor pair ``(key [B, d_k], value [B, d_v])`` standing for ``key value^T``. Any dtype; the trainer
casts to the SAE's.

The protocol (``WriteSource``) is two members:

- ``num_samples``: samples per epoch, or ``None`` if unknown (then train with a sample budget).
- ``batches(epoch, batch_size, start=0)``: the epoch's batches of ``batch_size`` samples (the last may
  be smaller), beginning with batch number ``start``. The order must be a function of ``epoch`` (and
  the source's own seed) only, so that a resumed run sees exactly the batches the interrupted one
  would have: this is what makes resuming exact. Shuffling is the source's job.

An on-disk store (sharded safetensors of states or factor pairs) implements these two members and
streams. ``as_source`` wraps plain objects: a tensor of states, a ``(keys, values)`` pair of tensors,
or any re-iterable of batches (re-batched to ``batch_size``, in its own order, unshuffled).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

Batch = Tensor | tuple[Tensor, Tensor]


@runtime_checkable
class WriteSource(Protocol):
    """What the trainer reads; see the module docstring."""

    @property
    def num_samples(self) -> int | None: ...

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[Batch]: ...


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> Tensor:
    if not shuffle:
        return torch.arange(n)
    # A fresh generator per (seed, epoch): the order never depends on what ran before.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction}).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class TensorSource:
    """Dense states held in memory, ``[N, d_k, d_v]`` or ``[N, d_in]``, shuffled per epoch.

    Args:
        states: The samples.
        shuffle: Reshuffle every epoch (order = f(seed, epoch)).
        seed: Shuffling seed.
    """

    def __init__(self, states: Float[Tensor, "N ..."], shuffle: bool = True, seed: int = 0):
        self.states = states
        self.shuffle = shuffle
        self.seed = seed

    @property
    def num_samples(self) -> int:
        return self.states.shape[0]

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[Tensor]:
        order = _epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        for i in range(start * batch_size, self.num_samples, batch_size):
            yield self.states[order[i : i + batch_size]]

    def split(self, val_fraction: float = 0.2, seed: int = 42) -> tuple[TensorSource, TensorSource]:
        """Random train/validation split (paper: 80/20 with split seed = init seed); val unshuffled."""
        train, val = _split_indices(self.num_samples, val_fraction, seed)
        return (
            TensorSource(self.states[train], self.shuffle, self.seed),
            TensorSource(self.states[val], shuffle=False),
        )


class FactorSource:
    """Rank-1 writes held in memory as factors ``keys [N, d_k]``, ``values [N, d_v]``.

    Args:
        keys: Key factors.
        values: Value factors (for Gated DeltaNet, ``beta * v``).
        shuffle: Reshuffle every epoch.
        seed: Shuffling seed.
    """

    def __init__(
        self,
        keys: Float[Tensor, "N d_k"],
        values: Float[Tensor, "N d_v"],
        shuffle: bool = True,
        seed: int = 0,
    ):
        if keys.shape[0] != values.shape[0]:
            raise ValueError(
                f"keys and values need the same number of samples (got {keys.shape[0]} and "
                f"{values.shape[0]})."
            )
        self.keys, self.values = keys, values
        self.shuffle = shuffle
        self.seed = seed

    @property
    def num_samples(self) -> int:
        return self.keys.shape[0]

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = _epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        for i in range(start * batch_size, self.num_samples, batch_size):
            idx = order[i : i + batch_size]
            yield self.keys[idx], self.values[idx]

    def split(self, val_fraction: float = 0.2, seed: int = 42) -> tuple[FactorSource, FactorSource]:
        """Random train/validation split; val unshuffled."""
        train, val = _split_indices(self.num_samples, val_fraction, seed)
        return (
            FactorSource(self.keys[train], self.values[train], self.shuffle, self.seed),
            FactorSource(self.keys[val], self.values[val], shuffle=False),
        )


def _concat(parts: list[Batch]) -> Batch:
    if isinstance(parts[0], tuple):
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # type: ignore[index]
    return torch.cat(parts)  # type: ignore[arg-type]


def batch_rows(batch: Batch) -> int:
    """Samples in a batch (dense or factor form)."""
    return batch[0].shape[0] if isinstance(batch, tuple) else batch.shape[0]


def slice_batch(batch: Batch, a: int, b: int) -> Batch:
    """Samples ``a`` to ``b`` of a batch (dense or factor form)."""
    if isinstance(batch, tuple):
        return batch[0][a:b], batch[1][a:b]
    return batch[a:b]


class IterableSource:
    """Any re-iterable of batches (tensors or factor pairs), re-batched to the trainer's batch size.

    Every epoch iterates the object again, in its own order. A one-shot iterator can feed only one
    epoch (use a sample budget, ``TrainerConfig.max_samples``).

    Args:
        iterable: Yields batches of any size.
        num_samples: Samples per epoch, if known.
    """

    def __init__(self, iterable: Iterable[Batch], num_samples: int | None = None):
        self.iterable = iterable
        self._num_samples = num_samples
        self._one_shot = iter(iterable) is iterable
        self._used = False

    @property
    def num_samples(self) -> int | None:
        return self._num_samples

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[Batch]:
        if self._one_shot and self._used:
            raise RuntimeError(
                "this source wraps a one-shot iterator, already read once; pass a list or another "
                "re-iterable, or train with TrainerConfig.max_samples within one pass."
            )
        self._used = True
        pending: list[Batch] = []
        n_pending, index = 0, 0
        for chunk in self.iterable:
            pending.append(chunk)
            n_pending += batch_rows(chunk)
            while n_pending >= batch_size:
                merged = _concat(pending)
                if index >= start:
                    yield slice_batch(merged, 0, batch_size)
                index += 1
                rest = slice_batch(merged, batch_size, n_pending)
                n_pending -= batch_size
                pending = [rest] if n_pending else []
        if n_pending and index >= start:
            yield _concat(pending)


def as_source(data: WriteSource | Tensor | tuple[Tensor, Tensor] | Iterable[Batch]) -> WriteSource:
    """Wrap training data as a ``WriteSource`` (see the module docstring for what is accepted)."""
    if isinstance(data, WriteSource):
        return data
    if isinstance(data, Tensor):
        return TensorSource(data)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return FactorSource(*data)
    if isinstance(data, Iterable):
        return IterableSource(data)
    raise TypeError(
        f"cannot read training data from {type(data).__name__}; pass a WriteSource, a tensor of "
        "states, a (keys, values) pair of tensors, or an iterable of batches."
    )
