"""Mamba-2 checkpoints in the original ``mamba_ssm`` format (as published for state-spaces/mamba2-370m).

Such a checkpoint has a ``config.json`` with ``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg``,
``pad_vocab_size_multiple``, ``tie_embeddings`` ... and a ``pytorch_model.bin`` (or safetensors)
state dict with ``backbone.embedding.*``, ``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm.*``,
``backbone.norm_f.*`` keys. It is converted to ``Mamba2ForCausalLM`` on the fly: config fields are
mapped (with mamba_ssm's own defaults for what ``ssm_cfg`` leaves out), the vocabulary is padded the
way mamba_ssm pads it, and ``torch.load`` only ever runs with ``weights_only=True``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.utils import cached_file

__all__ = ["is_mamba_ssm_config", "mamba2_config_from_ssm", "load_mamba_ssm_checkpoint", "read_config"]

# mamba_ssm's Mamba2 defaults, for the fields a checkpoint's ssm_cfg may leave out.
_SSM_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, dt_limit=(0.0, float("inf")))


def read_config(name_or_path: str, **kwargs: Any) -> dict | None:
    """The raw ``config.json`` of a hub id or local directory (None if there is none)."""
    path = cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **kwargs)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def is_mamba_ssm_config(config: dict) -> bool:
    """Whether a raw config is mamba_ssm's (not a transformers config)."""
    return "model_type" not in config and {"d_model", "n_layer"} <= config.keys()


def mamba2_config_from_ssm(config: dict) -> Mamba2Config:
    """Translate a mamba_ssm ``MambaConfig`` dict into a ``Mamba2Config``.

    Raises:
        ValueError: For checkpoints that are not a plain Mamba-2 stack (Mamba-1 layers, attention
            layers, MLPs), which ``Mamba2ForCausalLM`` cannot represent.
    """
    ssm = {**_SSM_DEFAULTS, **config.get("ssm_cfg", {})}
    if ssm.get("layer", "Mamba2") != "Mamba2":
        raise ValueError(f"This mamba_ssm checkpoint uses {ssm['layer']} layers; only Mamba2 layers are supported.")
    if config.get("attn_layer_idx") or config.get("d_intermediate", 0):
        raise ValueError("This mamba_ssm checkpoint has attention layers or MLPs; only pure Mamba-2 stacks load.")
    if ssm.get("D_has_hdim", False) or not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
        raise ValueError("Unsupported Mamba-2 variant (D_has_hdim, no gated RMSNorm, or norm_before_gate).")
    vocab = config["vocab_size"]
    multiple = config.get("pad_vocab_size_multiple", 1)
    vocab += (-vocab) % multiple
    d_model = config["d_model"]
    return Mamba2Config(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=config["n_layer"],
        state_size=ssm["d_state"],
        conv_kernel=ssm["d_conv"],
        expand=ssm["expand"],
        head_dim=ssm["headdim"],
        num_heads=d_model * ssm["expand"] // ssm["headdim"],
        n_groups=ssm["ngroups"],
        chunk_size=ssm["chunk_size"],
        time_step_limit=tuple(ssm["dt_limit"]),
        use_bias=ssm.get("bias", False),
        use_conv_bias=ssm.get("conv_bias", True),
        residual_in_fp32=config.get("residual_in_fp32", True),
        layer_norm_epsilon=config.get("norm_epsilon", 1e-5),
        tie_word_embeddings=config.get("tie_embeddings", True),
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )


def _state_dict(name_or_path: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **kwargs)
        if path is None:
            continue
        if filename.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{name_or_path} has a mamba_ssm config.json but neither model.safetensors nor pytorch_model.bin")


def load_mamba_ssm_checkpoint(
    name_or_path: str, config: dict, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> Mamba2ForCausalLM:
    """Build a ``Mamba2ForCausalLM`` from a mamba_ssm-format checkpoint.

    Args:
        name_or_path: Hub id or local directory.
        config: Its raw ``config.json``.
        dtype: Parameter dtype.
        **kwargs: Passed to ``transformers.utils.cached_file`` (revision, cache_dir, token...).
    """
    hf_config = mamba2_config_from_ssm(config)
    state = {k.removeprefix("model."): v for k, v in _state_dict(name_or_path, **kwargs).items()}
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    with torch.device("meta"):
        model = Mamba2ForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{name_or_path}: the mamba_ssm state dict does not fit its config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})."
        )
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()
