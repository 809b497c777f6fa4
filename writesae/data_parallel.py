"""Data-parallel training of one SAE: PyTorch's DistributedDataParallel over the ranks of ``torchrun``.

Every rank holds the same SAE and trains on its share of each global batch (contiguous rows,
`writesae.distributed.rank_range`), so ``W`` ranks with a global batch of ``B`` train like one
process with batch ``B``. `DataParallel` is what `writesae.trainer.WriteSAETrainer` asks whenever
a quantity must be the whole batch's rather than one rank's:

- gradients: ``DistributedDataParallel`` averages them over ranks; each rank's loss (a mean over
  its rows) is weighted by ``W * n_rank / n_batch`` first, so the average is the gradient of the
  global batch's mean loss even when the shares differ (the last batch of an epoch);
- which atoms fired (dead-atom counters), BatchTopK's smallest active code (its inference
  threshold), the input scale and mean, validation sums: all-reduced;
- resampling draws from the whole global batch, gathered to every rank, with the trainer's
  generator, whose state every rank shares.

Everything else (Adam, decoder re-normalisation, the schedule) is the same arithmetic on the same
numbers on every rank, so the copies stay equal. Only rank 0 writes files. In one process every
method is the identity and nothing is wrapped.

BatchTopK's batch-wide selection is made within each rank's share of the batch (``k * n_rank``
codes per rank), not over the global batch: with ``sparsity="batchtopk"`` data-parallel training
differs from one process by that choice, and the trainer warns. TopK (the paper's default) is per
sample and unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from writesae.data import Batch, WriteSource, batch_rows, slice_batch
from writesae.distributed import World, all_gather_objects, all_reduce, rank_range
from writesae.training_sae import LossOutput, SparsityLoss, WriteTrainingSAE

__all__ = ["DataParallel"]


class _Loss(torch.nn.Module):
    """The SAE's training loss as a module's ``forward``, which is what DistributedDataParallel wraps."""

    def __init__(self, sae: WriteTrainingSAE) -> None:
        super().__init__()
        self.sae = sae

    def forward(
        self, batch: Batch, dead_mask: Tensor | None, aux_slots: int | None, sparsity_loss: SparsityLoss | None
    ) -> LossOutput:
        return self.sae.compute_loss(batch, dead_mask, aux_slots, sparsity_loss)


class DataParallel:
    """The trainer's view of the other ranks (see the module docstring).

    Args:
        world: This process's place among the ranks (``World()``: one process).
        sae: The SAE every rank trains (its weights are broadcast from rank 0 when wrapped).
    """

    def __init__(self, world: World, sae: WriteTrainingSAE) -> None:
        self.world = world
        self.sae = sae
        self._loss: torch.nn.Module = _Loss(sae)
        if world.distributed:
            if not dist.is_initialized():
                raise RuntimeError(
                    f"data-parallel training as rank {world.rank} of {world.world_size} needs a process group; "
                    "train inside `with writesae.distributed.process_group(device):` (writesae train does)"
                )
            ids = [sae.device] if torch.device(sae.device).type == "cuda" else None
            # Buffers (BatchTopK's threshold, a fixed input mean) are kept equal by the trainer itself.
            self._loss = DistributedDataParallel(self._loss, device_ids=ids, broadcast_buffers=False)

    def rows(self, source: WriteSource, epoch: int, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """This rank's rows of each of the epoch's global batches, from batch ``start`` on.

        A store reads only these rows (`writesae.streaming.StoreSource.rank_batches`); other
        sources are read whole and sliced.
        """
        world = self.world
        if not world.distributed:
            yield from source.batches(epoch, batch_size, start)
        elif hasattr(source, "rank_batches"):
            yield from source.rank_batches(epoch, batch_size, start, world.rank, world.world_size)
        else:
            for batch in source.batches(epoch, batch_size, start):
                yield slice_batch(batch, *rank_range(batch_rows(batch), world.rank, world.world_size))

    def loss(
        self,
        batch: Batch,
        dead_mask: Tensor | None,
        aux_slots: int | None = None,
        sparsity_loss: SparsityLoss | None = None,
    ) -> LossOutput:
        """The loss of this rank's rows (through DistributedDataParallel, whose backward averages
        gradients); arguments as `WriteTrainingSAE.compute_loss`'s."""
        return self._loss(batch, dead_mask, aux_slots, sparsity_loss)

    def loss_weight(self, n_rank: int, n_batch: int) -> float:
        """The factor on this rank's mean loss that makes the averaged gradient the global batch's mean."""
        return self.world.world_size * n_rank / n_batch if self.world.distributed else 1.0

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks (in place)."""
        return all_reduce(tensor, self.world)

    def any(self, flags: Tensor) -> Tensor:
        """Elementwise OR of boolean ``flags`` over ranks."""
        if not self.world.distributed:
            return flags
        return all_reduce(flags.to(torch.uint8), self.world, dist.ReduceOp.MAX).bool()

    def min(self, tensor: Tensor) -> Tensor:
        """``tensor``'s elementwise minimum over ranks (in place)."""
        return all_reduce(tensor, self.world, dist.ReduceOp.MIN)

    def gather(self, batch: Batch, values: Tensor) -> tuple[Batch, Tensor]:
        """The global batch and its per-sample ``values``, from every rank's rows in rank order.

        Goes through the host (pickled); the trainer calls it only when it resamples dead atoms.
        """
        if not self.world.distributed:
            return batch, values
        device = values.device
        local: Any = (tuple(t.cpu() for t in batch) if isinstance(batch, tuple) else batch.cpu(), values.cpu())
        shares = all_gather_objects(local, self.world)
        if isinstance(batch, tuple):
            merged: Batch = tuple(torch.cat([s[0][i] for s in shares]).to(device) for i in range(len(batch)))  # type: ignore[assignment]
        else:
            merged = torch.cat([s[0] for s in shares]).to(device)
        return merged, torch.cat([s[1] for s in shares]).to(device)
