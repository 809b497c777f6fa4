"""Small builders shared by the tests (no downloads)."""

from __future__ import annotations

import copy

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import PreTrainedTokenizerFast

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.presets import build_preset

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids fit the tiny presets' vocabulary of 256."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({ch: i + 4 for i, ch in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_pair(preset: str = "tiny-random:qwen3.5", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A hooked tiny model and an untouched copy of the same HF model, for parity checks."""
    hf = build_preset(preset, seed=seed, dtype=dtype)
    reference = copy.deepcopy(hf)
    return HookedRecurrentModel(hf, model_name=preset), reference


def random_tokens(batch: int, length: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def left_padding_mask(batch: int, length: int, pads: list[int]) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return mask


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward), to prove that a
    computation never materialises per-sample matrices."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def planted_rank1_states(
    n_atoms: int, d_k: int, d_v: int, n: int, per_state: int, low: float, high: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A planted dictionary and states made of it, for SAE recovery tests.

    Returns:
        ``planted [n_atoms, d_k, d_v]``: random unit rank-1 atoms; ``states [n, d_k, d_v]``: each the sum of
        ``per_state`` distinct planted atoms with coefficients uniform in ``[low, high)``.
    """
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n_atoms, d_k, generator=g), dim=-1)
    vals = torch.nn.functional.normalize(torch.randn(n_atoms, d_v, generator=g), dim=-1)
    planted = keys[:, :, None] * vals[:, None, :]
    which = torch.rand(n, n_atoms, generator=g).argsort(-1)[:, :per_state]
    coef = torch.rand(n, per_state, generator=g) * (high - low) + low
    return planted, torch.einsum("ns,nskv->nkv", coef, planted[which])
