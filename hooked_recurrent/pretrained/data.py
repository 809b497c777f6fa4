"""Token streams and the deterministic order in which training windows are read.

The files of a split are tokenized in sorted-path order, each followed by
``<|endoftext|>``, and concatenated into one stream. The stream is cut into
non-overlapping windows of ``seq_len`` tokens (the remainder is dropped). Each
epoch visits the windows in a permutation drawn from a generator seeded with
``(seed, epoch)``, so the batch at any step is a pure function of the seed and
a :class:`DataPosition`: resuming needs nothing else.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from transformers import PreTrainedTokenizerFast

from hooked_recurrent.pretrained.corpus import SourceFile


def encode_stream(tokenizer: PreTrainedTokenizerFast, files: list[SourceFile]) -> np.ndarray:
    """Tokenizes files into one stream, each file followed by EOS.

    Args:
        tokenizer: The corpus tokenizer (no BOS is added).
        files: Files in the order they should appear.

    Returns:
        A 1-D ``int64`` array of token ids.
    """
    # The backend tokenizer skips transformers' per-call length warnings.
    encodings = tokenizer.backend_tokenizer.encode_batch([f.text for f in files], add_special_tokens=False)
    pieces = []
    for enc in encodings:
        pieces.append(np.asarray(enc.ids, dtype=np.int64))
        pieces.append(np.asarray([tokenizer.eos_token_id], dtype=np.int64))
    return np.concatenate(pieces)


def to_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cuts a stream into ``[n, seq_len]`` non-overlapping windows."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the next batch comes from.

    Attributes:
        epoch: Zero-based pass over the training windows.
        batch: Index of the next batch within that epoch's permutation.
    """

    epoch: int = 0
    batch: int = 0


class WindowSampler:
    """Serves batches of training windows in a seeded, resumable order.

    Args:
        windows: ``[n, seq_len]`` training windows.
        batch_size: Windows per batch; the last partial batch of an epoch is
            skipped so every step sees the same number of tokens.
        seed: Seed of the per-epoch permutations.
    """

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int):
        if len(windows) < batch_size:
            raise ValueError(f"{len(windows)} windows cannot fill a batch of {batch_size}")
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(windows) // batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def batch(self, position: DataPosition) -> tuple[np.ndarray, DataPosition]:
        """Returns the batch at ``position`` and the position after it."""
        perm = self._permutation(position.epoch)
        start = position.batch * self.batch_size
        batch = self.windows[perm[start : start + self.batch_size]]
        nxt = position.batch + 1
        if nxt == self.batches_per_epoch:
            return batch, DataPosition(position.epoch + 1, 0)
        return batch, DataPosition(position.epoch, nxt)
