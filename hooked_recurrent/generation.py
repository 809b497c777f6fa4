"""Generation with hooks live at every step, TransformerLens style.

The prompt runs once into a `RecurrentCache`; each new token then runs alone (``pos`` of length
1), so every hook point fires at every decode step, ``hook.start_position`` tells a hook which
absolute position it is at, and edits made at a step (of a write, a state, a residual...) live on
in the cache for every later step. Positions and masks follow Hugging Face ``generate``, so greedy
output equals ``hf_model.generate(..., do_sample=False)`` token for token, batched and left-padded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .cache import RecurrentCache

if TYPE_CHECKING:
    from .model import HookedRecurrentModel

__all__ = ["generate", "sample_logits", "check_sampling", "generation_positions"]


def sample_logits(
    logits: Float[Tensor, "batch d_vocab"],
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """Pick the next token: argmax, or a sample after temperature, top-k and top-p filtering."""
    check_sampling(temperature, top_k, top_p)
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that mean nothing (they would divide by zero or keep no token).

    Raises:
        ValueError: naming the argument, its value and the valid range.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: give a number >= 0 (0 or do_sample=False: greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: give a whole number >= 1, or None to keep every token")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: give a probability mass in (0, 1], or None to keep every token")


def generation_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Rotary positions of a left-padded prompt, as HF ``generate`` computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def generate(
    model: HookedRecurrentModel,
    input: str | list[str] | Int[Tensor, "batch pos"] = "",
    max_new_tokens: int = 10,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    return_type: Literal["input", "str", "tokens"] = "input",
    verbose: bool = True,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] = "left",
    generator: torch.Generator | None = None,
    return_cache: bool = False,
    cache: RecurrentCache | None = None,
) -> Any:
    """Generate ``max_new_tokens`` tokens after a prompt.

    Args:
        model: The hooked model (hooks added with ``model.hooks(...)`` fire at every step).
        input: A string, a list of strings (left-padded), or a ``[batch, pos]`` token tensor.
        max_new_tokens: Tokens to add.
        do_sample: Sample (True) or take the argmax (False).
        temperature: Softmax temperature for sampling.
        top_k: Keep only the k most likely tokens when sampling.
        top_p: Nucleus sampling mass.
        stop_at_eos: Stop a sequence at its end-of-sequence token; finished sequences are padded.
        eos_token_id: Token id(s) ending a sequence (default: the tokenizer's, else the model config's).
        attention_mask: For token input with left padding: 0 at padded positions.
        return_type: ``"input"`` (strings for text input, tokens otherwise), ``"str"`` or ``"tokens"``.
        verbose: Show a progress bar.
        prepend_bos: For text input, whether to prepend BOS.
        padding_side: Padding side for a batch of strings (left, so that all prompts end together).
        generator: Random generator for sampling.
        return_cache: Also return the `RecurrentCache` after the last token.
        cache: A `RecurrentCache` to continue from: the input holds the tokens that follow the
            ones it has seen, and it is updated in place (``cache.clone()`` first to keep it).

    Returns:
        The prompt followed by the generated tokens, as tokens ``[batch, pos + new]`` or strings
        (and the cache, with ``return_cache``).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: give a whole number >= 0 (0 returns the prompt)")
    check_sampling(temperature, top_k, top_p)
    text_input = isinstance(input, (str, list))
    if text_input:
        tokens, mask = model._tokenize(input, prepend_bos=prepend_bos, padding_side=padding_side)
        attention_mask = mask if attention_mask is None else attention_mask
    elif isinstance(input, torch.Tensor):
        tokens = (input if input.dim() == 2 else input[None]).to(model.cfg.device)
    else:
        raise TypeError(f"input must be a string, a list of strings or a [batch, pos] token tensor, not {type(input).__name__}")
    if attention_mask is not None:
        attention_mask = attention_mask.to(tokens.device)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the tokens {tuple(tokens.shape)}")
    batch, prompt_length = tokens.shape
    if prompt_length == 0:
        raise ValueError("generate needs a prompt of at least one token")
    if attention_mask is not None and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError(
            "generate continues every sequence from its last position, so padding must come first, "
            "but this prompt is right-padded (its attention_mask has 0s after real tokens). Pad on the "
            "left: padding_side='left' (the default) for text, left-padded tokens and mask otherwise."
        )
    eos_ids = _eos_ids(model, eos_token_id) if stop_at_eos else []
    pad_id = _pad_id(model, eos_ids)

    uses_positions = model.architecture.uses_position_ids
    positions = None
    if uses_positions:
        mask = attention_mask if attention_mask is not None else torch.ones_like(tokens)
        if cache is not None:  # positions continue from what the cache has seen
            mask = cache.mask_after(mask, prompt_length)
        positions = generation_positions(mask)[:, -prompt_length:]
    cache = RecurrentCache(model, batch) if cache is None else cache
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    generated = []
    with torch.no_grad():
        logits = model(tokens, attention_mask=attention_mask, cache=cache, position_ids=positions)
        for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generating"):
            next_tokens = sample_logits(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            if eos_ids:
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
                finished |= torch.isin(next_tokens, torch.tensor(eos_ids, device=next_tokens.device))
            generated.append(next_tokens)
            if (eos_ids and finished.all()) or len(generated) == max_new_tokens:
                break
            if positions is not None:
                positions = positions[:, -1:] + 1
            logits = model(next_tokens[:, None], cache=cache, position_ids=positions)

    output = torch.cat([tokens, torch.stack(generated, dim=1)], dim=1) if generated else tokens
    if return_type == "str" or (return_type == "input" and text_input):
        output = model.to_string(output)
        if isinstance(input, str):
            output = output[0]
    return (output, cache) if return_cache else output


def _eos_ids(model: HookedRecurrentModel, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
            eos_token_id = model.tokenizer.eos_token_id
        else:
            eos_token_id = model.hf_model.config.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _pad_id(model: HookedRecurrentModel, eos_ids: list[int]) -> int:
    for candidate in (
        getattr(model.tokenizer, "pad_token_id", None),
        model.hf_model.config.pad_token_id,
        eos_ids[0] if eos_ids else None,
    ):
        if candidate is not None:
            return candidate
    return 0
