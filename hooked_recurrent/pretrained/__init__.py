"""Small language models trained on the Python standard library, shipped in the package.

Two models live in this folder, each a Hugging Face model directory (config,
safetensors weights, tokenizer, ``training_record.json``) that loads offline:

* ``"stdlib:qwen3.5"``: a ``Qwen3_5ForCausalLM`` (3 Gated DeltaNet layers + 1
  gated-attention layer).
* ``"stdlib:mamba2"``: a ``Mamba2ForCausalLM`` (8 Mamba-2 layers).

Names contain a colon, which a Hugging Face hub id cannot, so a shipped name is
never mistaken for a hub id. This module imports only ``pathlib`` so that
resolving a name stays cheap; training code lives in the submodules.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hooked_recurrent.pretrained import shipped_model_path

    path = shipped_model_path("stdlib:qwen3.5")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import pathlib

SHIPPED_PREFIX = "stdlib:"

SHIPPED_MODELS: dict[str, str] = {
    "stdlib:qwen3.5": "stdlib-qwen3.5",
    "stdlib:mamba2": "stdlib-mamba2",
}


def shipped_model_path(name: str) -> pathlib.Path | None:
    """Resolves a shipped model name to its folder inside the package.

    Args:
        name: A model name, e.g. ``"stdlib:mamba2"`` or a hub id.

    Returns:
        The model folder, or None if ``name`` is not a shipped-model name
        (so the caller can treat it as a hub id or a local path).

    Raises:
        ValueError: If ``name`` starts with ``"stdlib:"`` but names no shipped
            model; the message lists the valid names.
    """
    folder = SHIPPED_MODELS.get(name)
    if folder is not None:
        return pathlib.Path(__file__).with_name(folder)
    if name.startswith(SHIPPED_PREFIX):
        valid = ", ".join(sorted(SHIPPED_MODELS))
        raise ValueError(f"unknown shipped model {name!r}; valid names are: {valid}")
    return None
