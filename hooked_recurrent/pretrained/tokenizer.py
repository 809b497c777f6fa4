"""A small byte-level BPE tokenizer trained on the stdlib training split.

Conventions, chosen to match Qwen's:

* No BOS token is prepended; ``encode`` returns exactly the text's tokens.
* ``<|endoftext|>`` is the EOS token and separates files in the training stream.
* ``<|pad|>`` is a distinct pad token, so padding is never confused with EOS.

Byte-level BPE means every string round-trips exactly, whatever it contains.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer.

    Args:
        texts: Training documents (the training split only, so validation
            statistics are not leaked into the vocabulary).
        vocab_size: Total vocabulary size, special tokens included.

    Returns:
        A transformers fast tokenizer; ``save_pretrained`` makes it loadable
        with ``AutoTokenizer.from_pretrained``.
    """
    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False: a file's first token must not gain a phantom space.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # Start from all 256 bytes so that no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """UTF-8 byte length of each token id, for bits-per-byte accounting.

    In byte-level BPE every character of a vocabulary entry stands for exactly
    one byte. Special tokens count as one byte each: EOS stands in for the
    boundary between two files, and one byte is the cheapest honest charge.

    Args:
        tokenizer: A tokenizer produced by :func:`train_tokenizer`.

    Returns:
        A list indexed by token id.
    """
    lengths = [1] * len(tokenizer)
    special = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if idx not in special:
            lengths[idx] = len(token)
    return lengths
