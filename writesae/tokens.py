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
    generator = torch.Generator().manual_seed(seed)
    if source == "random":
        return torch.randint(0, model.cfg.d_vocab, (n_sequences, seq_len), generator=generator)
    tokenizer = model._require_tokenizer("token_blocks")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = None if source == "stdlib" else n_sequences * seq_len * 4  # enough to draw from
    for i, text in enumerate(_documents(source, split)):
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if (max_documents is not None and i + 1 >= max_documents) or (needed is not None and len(stream) >= needed):
            break
    n_blocks = len(stream) // seq_len
    if n_blocks < n_sequences:
        raise ValueError(
            f"{source!r} ({split}) gives {n_blocks} blocks of {seq_len} tokens; asked for {n_sequences}. "
            "Ask for fewer or shorter blocks."
        )
    blocks = torch.tensor(stream[: n_blocks * seq_len]).reshape(n_blocks, seq_len)
    return blocks[torch.randperm(n_blocks, generator=generator)[:n_sequences]]
