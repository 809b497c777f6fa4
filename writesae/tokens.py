"""Token blocks to run models on: the offline stdlib corpus, local text, a Hugging Face dataset.

``token_blocks(model, source, ...)`` returns ``[n_sequences, seq_len]`` token ids made by packing
documents (separated by the tokenizer's end-of-text token) into fixed-length blocks, the way the
paper packs OpenWebText into 1,024-token blocks. Blocks are drawn with a seeded permutation.

Sources:
    ``"stdlib"``: the Python standard library's own sources (always available, no download),
        with the file-level train/validation split of the shipped models (``split=``).
    a path: a text file, or a directory of ``*.txt`` / ``*.py`` / ``*.md`` files.
    ``"hf:NAME[:CONFIG]"``: a Hugging Face dataset's ``text`` column, streamed (needs the network),
        e.g. ``hf:Skylion007/openwebtext`` as in the paper.
    ``"random"``: uniform random token ids (for models without a tokenizer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["token_blocks"]


def _documents(source: str, split: Literal["train", "val"]) -> Iterator[str]:
    if source == "stdlib":
        from hooked_recurrent.pretrained.corpus import list_source_files, split_files

        train, val = split_files(list_source_files())
        yield from (f.text for f in (train if split == "train" else val))
    elif source.startswith("hf:"):
        from datasets import load_dataset

        name, _, config = source[3:].partition(":")
        dataset = load_dataset(name, config or None, split="train", streaming=True)
        yield from (row["text"] for row in dataset)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"token source {source!r} is neither 'stdlib', 'random', 'hf:NAME' nor an existing path"
            )
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".py", ".md"})
        for file in files:
            yield file.read_text(errors="replace")


def _stream(tokenizer: Any, documents: Iterator[str], max_documents: int | None, needed: int | None) -> Tensor:
    """Token ids of the documents, each followed by the end-of-text token, as one 1-D tensor."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, text in enumerate(documents):
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if (max_documents is not None and i + 1 >= max_documents) or (needed is not None and len(stream) >= needed):
            break
    return torch.tensor(stream, dtype=torch.long)


_STDLIB_STREAMS: dict[tuple[str, str], Tensor] = {}


def _stdlib_stream(tokenizer: Any, split: str) -> Tensor:
    """The stdlib split's token stream, tokenized once per tokenizer and split (it takes seconds,
    and the demo, the tutorials and the tests draw from it many times). Tokenizers are told apart
    by their full serialisation, so two loads of the same one share the stream."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else f"object {id(tokenizer)}"
    key = (hashlib.sha256(identity.encode()).hexdigest(), split)
    if key not in _STDLIB_STREAMS:
        if len(_STDLIB_STREAMS) >= 4:
            _STDLIB_STREAMS.pop(next(iter(_STDLIB_STREAMS)))
        _STDLIB_STREAMS[key] = _stream(tokenizer, _documents("stdlib", split), None, None)
    return _STDLIB_STREAMS[key]


def token_blocks(
    model: Any,
    source: str = "stdlib",
    *,
    split: Literal["train", "val"] = "val",
    n_sequences: int = 64,
    seq_len: int = 128,
    seed: int = 0,
    max_documents: int | None = None,
) -> Int[Tensor, "n_sequences seq_len"]:
    """Pack documents of a source into ``n_sequences`` blocks of ``seq_len`` tokens.

    Args:
        model: A `HookedRecurrentModel` (its tokenizer is used; ``"random"`` needs none).
        source: See the module docstring.
        split: For ``"stdlib"``: the shipped models' training or held-out files.
        n_sequences: Blocks to return.
        seq_len: Tokens per block.
        seed: Seed of the block draw.
        max_documents: Stop reading after this many documents (streamed sources).
    """
    for name, value in (("n_sequences", n_sequences), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: give a whole number >= 1")
    generator = torch.Generator().manual_seed(seed)
    if source == "random":
        return torch.randint(0, model.cfg.d_vocab, (n_sequences, seq_len), generator=generator)
    tokenizer = model._require_tokenizer("token_blocks")
    if source == "stdlib" and max_documents is None:
        stream = _stdlib_stream(tokenizer, split)
    else:
        needed = None if source == "stdlib" else n_sequences * seq_len * 4  # enough to draw from
        stream = _stream(tokenizer, _documents(source, split), max_documents, needed)
    n_blocks = len(stream) // seq_len
    if n_blocks < n_sequences:
        raise ValueError(
            f"{source!r} ({split}) gives {n_blocks} blocks of {seq_len} tokens; asked for {n_sequences}. "
            "Ask for fewer or shorter blocks."
        )
    blocks = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return blocks[torch.randperm(n_blocks, generator=generator)[:n_sequences]]
