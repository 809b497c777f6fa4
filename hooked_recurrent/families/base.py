"""What a model family is: everything the hooked model needs to know about one HF model family.

A family says where its HF causal LM keeps the embedding, the layers and the final norm, how to
describe the model as a `HookedRecurrentConfig`, which hook container to build for the layer at
each depth, which kinds of token mixer its layers have (and how the HF cache stores their
states), and how to build a tiny random model of it for tests. Everything else (forward, caching,
editing, generation) is shared. Each family lives in one file of this package; the package's
``__init__`` lists them, and every table of supported models is derived from that list.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from ..config import HookedRecurrentConfig

if TYPE_CHECKING:
    from ..blocks import RunContext

__all__ = ["LayerKind", "Family", "ATTENTION", "TINY", "base_config", "attention_fields", "prepends_bos"]


@dataclass(frozen=True)
class LayerKind:
    """One kind of token mixer, as recorded in ``cfg.layer_types``.

    Attributes:
        name: The kind, e.g. ``"gated_deltanet"``.
        container: Name of the mixer's hook container inside ``blocks.{l}``, e.g. ``"linear_attn"``.
        recurrent: Whether it is matrix-recurrent (has write and state hooks).
        state_layout: How the HF cache stores one head's state: ``"key_value"`` (``[d_k, d_v]``,
            the layout of the hooks), ``"value_key"`` (``[d_v, d_k]``, as transformers' Mamba-2)
            or ``"key"`` (``[d_k]``: a head with ``d_v = 1``, as transformers' Mamba-1 channels).
    """

    name: str
    container: str
    recurrent: bool
    state_layout: str = "key_value"

    def hooked_state(self, stored: Tensor) -> Tensor:
        """A view of states as the HF cache stores them (``[..., head, ...]``) in the hooks'
        key-by-value layout ``[..., head, d_k, d_v]``; writing into the view writes the cache."""
        if self.state_layout == "value_key":
            return stored.transpose(-1, -2)
        if self.state_layout == "key":
            return stored.unsqueeze(-1)
        return stored


ATTENTION = LayerKind("attention", "attn", recurrent=False)

# Config fields every tiny preset shares: a vocabulary the tests' character tokenizer fits, weights
# large enough that a tiny model's recurrence shows in its logits, fixed special tokens.
TINY = dict(
    vocab_size=256, initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False
)


class Family:
    """Base class of a model family (one file per family; see the package docstring).

    Class attributes:
        name: Short name; the tiny random preset is ``tiny-random:{name}``.
        hf_class_names: The HF causal-LM classes it hooks.
        embedding_path, layers_path, final_norm_path: Where the HF causal LM keeps its token
            embedding, its list of layers (one module per depth) and its final norm.
        multimodal_class_names: HF wrappers (``...ForConditionalGeneration``) whose text model it hooks.
        layer_kinds: The kinds of token mixer its layers have.
        uses_position_ids: Whether its attention layers take rotary position ids.
        example_hub_id: A real checkpoint of the family (for the README's table).
        cache_class: A `RecurrentCache` subclass the HF model requires (None: the plain one).
    """

    name: ClassVar[str]
    hf_class_names: ClassVar[tuple[str, ...]]
    embedding_path: ClassVar[str] = "model.embed_tokens"
    layers_path: ClassVar[str] = "model.layers"
    final_norm_path: ClassVar[str] = "model.norm"
    multimodal_class_names: ClassVar[tuple[str, ...]] = ()
    layer_kinds: ClassVar[tuple[LayerKind, ...]]
    uses_position_ids: ClassVar[bool] = False
    example_hub_id: ClassVar[str]
    cache_class: ClassVar[type | None] = None

    # ------------------------------------------------------------------ the HF model

    @classmethod
    def matches(cls, hf_model: nn.Module) -> bool:
        return type(hf_model).__name__ in cls.hf_class_names

    @classmethod
    def embedding(cls, hf_model: nn.Module) -> nn.Module:
        return attrgetter(cls.embedding_path)(hf_model)

    @classmethod
    def layers(cls, hf_model: nn.Module) -> nn.ModuleList:
        return attrgetter(cls.layers_path)(hf_model)

    @classmethod
    def final_norm(cls, hf_model: nn.Module) -> nn.Module:
        return attrgetter(cls.final_norm_path)(hf_model)

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> nn.Module:
        """The hook container of the layer at depth ``index`` (installed on that layer only)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        """``model.cfg`` for an HF model of this family."""
        raise NotImplementedError

    @classmethod
    def text_model(cls, hf_model: nn.Module) -> nn.Module:
        """The causal text model of one of ``multimodal_class_names`` (sharing its modules)."""
        causal_class = _transformers_class(cls.hf_class_names[0])
        with torch.device("meta"):
            causal = causal_class(hf_model.config.text_config)
        causal.model = hf_model.model.language_model
        causal.lm_head = hf_model.lm_head
        return causal.to(next(hf_model.parameters()).device)

    @classmethod
    def logit_multiplier(cls, config: PretrainedConfig) -> float:
        """What the HF causal LM multiplies its unembedding's output by (muP models); folded into ``model.W_U``."""
        return 1.0

    @classmethod
    def layer_kind(cls, name: str) -> LayerKind:
        for kind in cls.layer_kinds:
            if kind.name == name:
                return kind
        raise KeyError(f"{cls.name} has no layer kind {name!r}; its kinds: {[k.name for k in cls.layer_kinds]}")

    # ------------------------------------------------------------------ the tiny random preset

    @classmethod
    def tiny_config(cls, **overrides: Any) -> PretrainedConfig:
        """The config of the ``tiny-random:{name}`` preset (keyword arguments override fields)."""
        raise NotImplementedError

    @classmethod
    def randomise(cls, model: PreTrainedModel, generator: torch.Generator) -> None:
        """Move a freshly built preset's weights off HF's init so every part shapes the logits.

        The default moves norm weights off their init and gives recurrent heads decay rates
        between about 0.5 and 0.999 per token (modules with ``A_log`` and ``dt_bias``), so states
        carry information across many positions and several recurrence chunks.
        """
        _slow_decays(model, generator)
        _randomise_norms(model, generator)

    @classmethod
    def build_preset(cls, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """The preset's HF model with random weights (deterministic for a seed)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _transformers_class(cls.hf_class_names[0])(cls.tiny_config())
        cls.randomise(model, generator)
        # Mixtures of experts in the loop of transformers' eager implementation: its default,
        # grouped_mm, has no float64 kernel, and the presets serve float64 exactness checks.
        model.set_experts_implementation("eager")
        return model.to(dtype).eval()


def prepends_bos(tokenizer: Any) -> bool:
    """Whether `to_tokens` should prepend BOS by default for this tokenizer."""
    return tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None


def base_config(hf_model: nn.Module, model_name: str, tokenizer: Any, **fields: Any) -> HookedRecurrentConfig:
    """A `HookedRecurrentConfig` with the fields every family fills the same way."""
    param = next(hf_model.parameters())
    c = hf_model.config
    return HookedRecurrentConfig(
        model_name=model_name,
        architecture=type(hf_model).__name__,
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        d_vocab=c.vocab_size,
        dtype=param.dtype,
        device=str(param.device),
        default_prepend_bos=prepends_bos(tokenizer),
        **fields,
    )


def attention_fields(config: PretrainedConfig) -> dict[str, Any]:
    """The attention fields of `HookedRecurrentConfig` from an HF config's usual names."""
    heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    return dict(n_attn_heads=heads, n_kv_heads=config.num_key_value_heads, d_head=d_head)


def _transformers_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def _slow_decays(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
            with torch.no_grad():
                a = torch.empty(module.A_log.shape).uniform_(0.002, 0.5, generator=generator)
                module.A_log.copy_(a.log())
                module.dt_bias.copy_(torch.randn(module.dt_bias.shape, generator=generator) * 0.5)


def _randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 1:
            with torch.no_grad():
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
