"""Tiny random models built from the real HF config classes, for tests and demos.

They load by name without any download: ``HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")``.
Weights are random but scaled so that every part matters for the logits (HF's default init of
std 0.02 leaves a tiny model's recurrence almost invisible in its output), and decays are slow
enough that states carry information across many positions and several recurrence chunks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Mamba2Config, Mamba2ForCausalLM, PreTrainedModel, Qwen3_5ForCausalLM, Qwen3_5TextConfig

__all__ = ["PRESETS", "tiny_qwen3_5_config", "tiny_mamba2_config", "build_preset"]


def tiny_qwen3_5_config(**overrides) -> Qwen3_5TextConfig:
    """A 4-layer Qwen3.5 (3 Gated DeltaNet + 1 gated attention) with d_k != d_v.

    Unequal key and value widths (16 and 24) and 2 key heads shared by 4 value heads make layout
    mistakes (transposed states, wrong head repetition) fail loudly in tests.
    """
    params = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        linear_conv_kernel_dim=4,
        max_position_embeddings=2048,
        initializer_range=0.15,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return Qwen3_5TextConfig(**params)


def tiny_mamba2_config(**overrides) -> Mamba2Config:
    """A 3-layer Mamba-2 with d_state (16) != head_dim (12) and 2 groups of 3 heads.

    A chunk size of 32 makes 150-token tests span several chunks of the SSD kernel.
    """
    params = dict(
        vocab_size=256,
        hidden_size=36,
        expand=2,
        num_heads=6,
        head_dim=12,
        state_size=16,
        n_groups=2,
        num_hidden_layers=3,
        conv_kernel=4,
        chunk_size=32,
        initializer_range=0.15,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return Mamba2Config(**params)


def _slow_decays(model: nn.Module, generator: torch.Generator) -> None:
    """Give recurrent heads decay rates between about 0.5 and 0.999 per token."""
    for module in model.modules():
        if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
            with torch.no_grad():
                a = torch.empty(module.A_log.shape).uniform_(0.002, 0.5, generator=generator)
                module.A_log.copy_(a.log())
                module.dt_bias.copy_(torch.randn(module.dt_bias.shape, generator=generator) * 0.5)


def _randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Move norm weights off their init so that zero-centred and plain RMSNorms both matter."""
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 1:
            with torch.no_grad():
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def build_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a preset's HF model with random weights (deterministic for a seed).

    Args:
        name: A key of `PRESETS`.
        seed: Seed of the random weights.
        dtype: Parameter dtype.
    """
    if name not in PRESETS:
        raise KeyError(f"Unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    config_fn, model_cls = PRESETS[name]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config_fn())
    _slow_decays(model, generator)
    _randomise_norms(model, generator)
    return model.to(dtype).eval()


PRESETS: dict[str, tuple] = {
    "tiny-random:qwen3.5": (tiny_qwen3_5_config, Qwen3_5ForCausalLM),
    "tiny-random:mamba2": (tiny_mamba2_config, Mamba2ForCausalLM),
}
