"""One loading path for hub ids and local directories (and names of built-in models).

Mamba-2 checkpoints in the original mamba_ssm format are recognised by their config and converted
on the fly (`hooked_recurrent.loading.mamba_ssm`).

``AutoModelForCausalLM`` maps a multimodal checkpoint (``Qwen3_5ForConditionalGeneration``, as
published for ``Qwen/Qwen3.5-0.8B``, or ``Qwen3_5MoeForConditionalGeneration``) onto its causal
text class and ignores the vision tower, so a hub id and a local copy of the same checkpoint take
exactly the same code path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..families import text_model_of
from ..presets import PRESETS, build_preset
from ..pretrained import shipped_model_path
from .mamba_ssm import is_mamba_ssm_config, load_mamba_ssm_checkpoint, read_config

__all__ = ["check_device", "check_dtype", "check_model_name", "load_hf_model", "load_tokenizer"]

# Weights are real numbers: an integer dtype would round them away.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

logger = logging.getLogger(__name__)


def load_hf_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    **hf_kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """Load an HF causal LM and its tokenizer (None if it has none).

    Args:
        name_or_path: A hub id, a local directory, a shipped model (``stdlib:qwen3.5``,
            ``stdlib:mamba2``) or a random preset (``tiny-random:qwen3.5``...).
        dtype: Parameter dtype (default float32, which the exactness guarantees assume).
        **hf_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(hf_model, tokenizer_or_None)``.
    """
    dtype = dtype or torch.float32
    check_model_name(name_or_path)
    shipped = shipped_model_path(name_or_path)  # "stdlib:..." names: a folder inside the package
    if shipped is not None:
        name_or_path = str(shipped)
    if name_or_path in PRESETS:
        return build_preset(name_or_path, dtype=dtype), None
    hub_kwargs = {k: hf_kwargs[k] for k in _HUB_KWARGS if k in hf_kwargs}
    raw_config = read_config(name_or_path, **hub_kwargs)
    if raw_config is not None and is_mamba_ssm_config(raw_config):
        hf_model = load_mamba_ssm_checkpoint(name_or_path, raw_config, dtype=dtype, **hub_kwargs)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **hf_kwargs)
    return text_model_of(hf_model).eval(), load_tokenizer(name_or_path)


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name (``"bfloat16"``); None stays None.

    Raises:
        ValueError: naming the value and the valid dtypes.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"dtype={dtype!r} is not a model dtype; give one of {names}")
    return dtype


def check_device(device: str | torch.device) -> torch.device:
    """A device that exists on this machine, checked before any weight moves.

    Raises:
        ValueError: naming the device and what this machine has.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: no CUDA GPU is visible to torch on this machine; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"device={str(device)!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r}: MPS is not available on this machine; use cpu")
    return parsed


def check_model_name(name_or_path: str) -> None:
    """Refuse, before any loading, a name that cannot be a model: not a string, empty, a file, or
    an unknown built-in name.

    Raises:
        ValueError: naming the value and what to give instead.
        KeyError: an unknown ``tiny-random:`` or ``stdlib:`` name (the message lists the valid ones).
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise ValueError(
            f"name_or_path={name_or_path!r}: give a hub id (e.g. 'Qwen/Qwen3.5-0.8B'), a model folder, "
            f"or a built-in name ({', '.join(sorted(PRESETS))}, stdlib:qwen3.5, stdlib:mamba2)"
        )
    name = str(name_or_path)
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"{name}: no such folder (a hub id has the form 'owner/name'); check the path of the model folder"
        )
    if Path(name).is_file():
        raise ValueError(
            f"{name} is a file; from_pretrained takes the model's folder (the one holding config.json "
            "and the weights), a hub id, or a built-in name"
        )
    shipped_model_path(name)  # raises for an unknown stdlib: name
    if ":" in name and name not in PRESETS and name.split(":", 1)[0] in {p.split(":", 1)[0] for p in PRESETS}:
        raise KeyError(f"Unknown built-in model {name!r}; built-in names: {', '.join(sorted(PRESETS))}")


_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name_or_path: str) -> Any:
    """The checkpoint's tokenizer, or None when it ships none (the model then runs on token ids)."""
    local = Path(name_or_path)
    if local.is_dir() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        logger.info("%s has no tokenizer files; the model runs on token tensors only.", name_or_path)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as err:
        logger.info("No tokenizer for %s (%s); the model runs on token tensors only.", name_or_path, err)
        return None
    # transformers builds an empty tokenizer from the config alone when no files exist.
    return tokenizer if len(tokenizer) > 1 else None
