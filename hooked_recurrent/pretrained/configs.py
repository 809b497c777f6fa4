"""Architectures of the two shipped models, and their training presets.

Both are the real Hugging Face classes at toy scale (about 1.4M parameters,
hidden size 128, tied embeddings), so every code path of the full-size models
is exercised, including the grouped value heads of Gated DeltaNet and the
gated full-attention layer of Qwen3.5.

The sizes were chosen by timing training steps on 2 CPU cores with the
transformers PyTorch fallbacks: at batch 8 x 512 tokens the Qwen3.5 model ran
about 5,800 tokens/s and the Mamba-2 model about 3,200 tokens/s, so the step
counts below give runs of roughly 15-30 minutes on an otherwise idle machine.
"""

from __future__ import annotations

import dataclasses

from transformers import Mamba2Config, PreTrainedConfig, Qwen3_5TextConfig

ARCHS = ("qwen3.5", "mamba2")


@dataclasses.dataclass(frozen=True)
class TrainPreset:
    """Default training hyperparameters for one architecture.

    Attributes:
        steps: Optimizer steps.
        lr: Peak learning rate.
    """

    steps: int
    lr: float


PRESETS = {
    "qwen3.5": TrainPreset(steps=1600, lr=3e-3),
    "mamba2": TrainPreset(steps=1000, lr=3e-3),
}


def build_config(arch: str, vocab_size: int, eos_token_id: int, pad_token_id: int) -> PreTrainedConfig:
    """Builds the model config for one architecture.

    Args:
        arch: ``"qwen3.5"`` or ``"mamba2"``.
        vocab_size: Tokenizer vocabulary size.
        eos_token_id: Id of ``<|endoftext|>``.
        pad_token_id: Id of ``<|pad|>``.

    Returns:
        A ``Qwen3_5TextConfig`` or ``Mamba2Config``.
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        tie_word_embeddings=True,  # halves the embedding cost of a small model
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,  # no BOS, as in Qwen
    )
    if arch == "qwen3.5":
        return Qwen3_5TextConfig(
            **common,
            intermediate_size=384,
            num_hidden_layers=4,
            # Three Gated DeltaNet layers then one gated-attention layer: the
            # 3:1 interleaving of the full-size Qwen3.5 models.
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            # Two query/key heads each shared by two value heads, the same
            # 1:2 grouping as the released checkpoints (16 and 32 heads).
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            max_position_embeddings=4096,
        )
    if arch == "mamba2":
        return Mamba2Config(
            **common,
            num_hidden_layers=8,  # no MLP blocks, so twice the layers for the same size
            expand=2,
            num_heads=8,
            head_dim=32,  # 8 * 32 == 128 * 2, as Mamba2Config requires
            state_size=64,
            n_groups=1,
            chunk_size=128,
            # The HF default of 0.1 makes tied-embedding logits start near
            # unit scale; 0.02 is what the original Mamba code uses.
            initializer_range=0.02,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def config_summary(config: PreTrainedConfig) -> dict:
    """The architecture-defining fields of a config, for the training record."""
    keys = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "layer_types", "num_attention_heads", "num_key_value_heads", "head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "linear_conv_kernel_dim", "expand", "num_heads", "state_size",
        "n_groups", "conv_kernel", "chunk_size", "tie_word_embeddings",
    ]
    summary = {}
    for key in keys:
        if key == "layer_types" and config.model_type == "mamba2":
            continue  # a derived property there, not a setting
        if hasattr(config, key):
            summary[key] = getattr(config, key)
    return summary
