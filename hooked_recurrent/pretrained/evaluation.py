"""Losses: the model's, a unigram baseline's, and bits per byte.

All losses are mean negative log-likelihoods in nats per predicted token. In a
window of ``n`` tokens the first token has no context and is not predicted, so
a window contributes ``n - 1`` predictions; the unigram baseline is scored on
exactly the same predicted tokens so the two numbers are comparable.

Bits per byte divide the summed loss (converted to bits) by the UTF-8 bytes of
the predicted tokens (see ``tokenizer.token_byte_lengths``), which makes models
with different tokenizers comparable.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast


@dataclasses.dataclass(frozen=True)
class LossResult:
    """A loss summed over some predicted tokens.

    Attributes:
        nats: Total negative log-likelihood.
        tokens: Number of predicted tokens.
        bytes: UTF-8 bytes of those tokens.
    """

    nats: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        """Mean nats per predicted token."""
        return self.nats / self.tokens

    @property
    def bits_per_byte(self) -> float:
        """Total bits divided by total bytes."""
        return self.nats / math.log(2) / self.bytes


def _predicted_bytes(windows: np.ndarray, byte_lengths: np.ndarray) -> int:
    return int(byte_lengths[windows[:, 1:]].sum())


@torch.no_grad()
def window_nats(model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """Summed next-token loss of a ``[batch, seq]`` tensor of token ids."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"
    ).item()


def model_loss(
    model: PreTrainedModel, windows: np.ndarray, byte_lengths: np.ndarray, batch_size: int = 8
) -> LossResult:
    """Model loss over ``[n, seq_len]`` windows, evaluated in eval mode.

    Args:
        model: A causal LM.
        windows: Token windows; each is scored independently (fresh state).
        byte_lengths: Byte length of each token id.
        batch_size: Windows per forward pass.

    Returns:
        The summed loss and counts.
    """
    was_training = model.training
    model.eval()
    nats = 0.0
    for start in range(0, len(windows), batch_size):
        nats += window_nats(model, torch.from_numpy(windows[start : start + batch_size]))
    model.train(was_training)
    return LossResult(nats, windows.shape[0] * (windows.shape[1] - 1), _predicted_bytes(windows, byte_lengths))


def unigram_log_probs(train_stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one-smoothed unigram log-probabilities estimated on a token stream."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def unigram_loss(log_probs: np.ndarray, windows: np.ndarray, byte_lengths: np.ndarray) -> LossResult:
    """The unigram model's loss on the same predicted tokens as :func:`model_loss`."""
    targets = windows[:, 1:]
    return LossResult(float(-log_probs[targets].sum()), targets.size, _predicted_bytes(windows, byte_lengths))


def heldout_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, window: int = 512
) -> float:
    """Mean loss (nats/token) of a model on a text, in fixed windows.

    The text is tokenized without special tokens and cut into consecutive
    windows of ``window`` tokens; the last, shorter window is kept if it has at
    least two tokens. Each window is scored alone, batch size one, so the
    result does not depend on any batching choice.

    Args:
        model: A causal LM; evaluated in eval mode, in its own dtype.
        tokenizer: Its tokenizer.
        text: The text to score, e.g. the shipped held-out sample.
        window: Tokens per window.

    Returns:
        Mean nats per predicted token.
    """
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        nats += window_nats(model, torch.tensor([chunk], dtype=torch.long))
        count += len(chunk) - 1
    model.train(was_training)
    return nats / count
