"""What differs between the supported Hugging Face model families.

An architecture knows where its HF model keeps the embedding, the layers and the final norm, how
to describe the model as a `HookedRecurrentConfig`, and which hook containers to build per layer.
Everything else (forward, caching, editing) is shared.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .blocks import Mamba2BlockHooks, Qwen3_5BlockHooks, RunContext
from .config import HookedRecurrentConfig

__all__ = [
    "Architecture",
    "Qwen3_5Architecture",
    "Mamba2Architecture",
    "architecture_of",
    "SUPPORTED_ARCHITECTURES",
]


class Architecture:
    """Base class: one HF causal-LM family."""

    hf_class_names: ClassVar[tuple[str, ...]] = ()
    uses_position_ids: ClassVar[bool] = False  # rotary attention layers take position ids

    @classmethod
    def matches(cls, hf_model: nn.Module) -> bool:
        return type(hf_model).__name__ in cls.hf_class_names

    @staticmethod
    def embedding(hf_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def layers(hf_model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    @staticmethod
    def final_norm(hf_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def build_block(hf_layer: nn.Module, index: int, context: RunContext) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        raise NotImplementedError


class Qwen3_5Architecture(Architecture):
    """Qwen3.5: Gated DeltaNet layers mixed with gated attention, SwiGLU MLPs."""

    hf_class_names = ("Qwen3_5ForCausalLM",)
    uses_position_ids = True

    @staticmethod
    def embedding(hf_model: nn.Module) -> nn.Module:
        return hf_model.model.embed_tokens

    @staticmethod
    def layers(hf_model: nn.Module) -> nn.ModuleList:
        return hf_model.model.layers

    @staticmethod
    def final_norm(hf_model: nn.Module) -> nn.Module:
        return hf_model.model.norm

    @staticmethod
    def build_block(hf_layer: nn.Module, index: int, context: RunContext) -> nn.Module:
        return Qwen3_5BlockHooks(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        kinds = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
        param = next(hf_model.parameters())
        return HookedRecurrentConfig(
            model_name=model_name,
            architecture=type(hf_model).__name__,
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            d_vocab=c.vocab_size,
            layer_types=[kinds[t] for t in c.layer_types[: c.num_hidden_layers]],
            n_heads=c.linear_num_value_heads,
            d_k=c.linear_key_head_dim,
            d_v=c.linear_value_head_dim,
            n_key_heads=c.linear_num_key_heads,
            d_mlp=c.intermediate_size,
            n_attn_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads,
            d_head=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
            conv_kernel=c.linear_conv_kernel_dim,
            dtype=param.dtype,
            device=str(param.device),
            default_prepend_bos=_prepends_bos(tokenizer),
        )


class Mamba2Architecture(Architecture):
    """Mamba-2: every block is norm -> SSD mixer -> residual add."""

    hf_class_names = ("Mamba2ForCausalLM",)

    @staticmethod
    def embedding(hf_model: nn.Module) -> nn.Module:
        return hf_model.backbone.embeddings

    @staticmethod
    def layers(hf_model: nn.Module) -> nn.ModuleList:
        return hf_model.backbone.layers

    @staticmethod
    def final_norm(hf_model: nn.Module) -> nn.Module:
        return hf_model.backbone.norm_f

    @staticmethod
    def build_block(hf_layer: nn.Module, index: int, context: RunContext) -> nn.Module:
        return Mamba2BlockHooks(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        param = next(hf_model.parameters())
        return HookedRecurrentConfig(
            model_name=model_name,
            architecture=type(hf_model).__name__,
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            d_vocab=c.vocab_size,
            layer_types=["mamba2"] * c.num_hidden_layers,
            n_heads=c.num_heads,
            d_k=c.state_size,
            d_v=c.head_dim,
            n_groups=c.n_groups,
            conv_kernel=c.conv_kernel,
            dtype=param.dtype,
            device=str(param.device),
            default_prepend_bos=_prepends_bos(tokenizer),
        )


def _prepends_bos(tokenizer: Any) -> bool:
    return tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None


SUPPORTED_ARCHITECTURES: list[type[Architecture]] = [Qwen3_5Architecture, Mamba2Architecture]


def architecture_of(hf_model: nn.Module) -> type[Architecture]:
    """The architecture class for an HF model, or a clear error listing what is supported."""
    for arch in SUPPORTED_ARCHITECTURES:
        if arch.matches(hf_model):
            return arch
    supported = ", ".join(name for arch in SUPPORTED_ARCHITECTURES for name in arch.hf_class_names)
    raise TypeError(
        f"HookedRecurrentModel cannot hook a {type(hf_model).__name__}; supported HF classes: {supported}. "
        "For a multimodal Qwen3.5 checkpoint, load it with HookedRecurrentModel.from_pretrained, which "
        "keeps its text model."
    )
