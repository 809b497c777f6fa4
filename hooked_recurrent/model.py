"""HookedRecurrentModel: a TransformerLens-style hooked model around a Hugging Face recurrent LM.

The HF model runs as it is: its modules keep their paths and parameters, and the forward of the
layer at each depth (and of the embedding and final norm) is routed through a hook container that
computes the same thing with named hook points in between (the TransformerBridge idea: wrap, don't
reimplement the model; see `hooked_recurrent.blocks`). What differs between model families lives in
`hooked_recurrent.families`, one file per family. On top of
the usual residual-stream and attention hooks, every matrix-recurrent mixer exposes its rank-1
write, its state, its gates and its read (see `hooked_recurrent.mixers.base`), lazily: writes and
states are only materialised when a hook or a cache asks for them.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint as TLHookPoint
from transformer_lens.utilities import Slice

from .activation_cache import RecurrentActivationCache
from .blocks import FinalNormHooks, RunContext, StopForward
from .cache import RecurrentCache
from .components import OutputHook
from .config import HookedRecurrentConfig
from .families import family_of, text_model_of
from .hook_points import HookPoint, observer
from .loading import check_device, check_dtype, load_hf_model
from .mixers.base import HeadHookList
from .splicing import SpliceMixin

__all__ = ["HookedRecurrentModel"]

NamesFilter = Callable[[str], bool] | Sequence[str] | str | None
# What TransformerLens' Slice takes: an index, (start, stop[, step]), a list/tensor of indices, or a Slice.
PosSlice = Slice | int | slice | tuple | list | Tensor | None
ModelInput = str | list[str] | Int[Tensor, "batch pos"]
Loss = Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]
_PER_HEAD_NAME = re.compile(r"(?P<mixer>.+)\.heads\.(?P<head>\d+)\.hook_(write|state)")


class HookedRecurrentModel(SpliceMixin, HookedRootModule):
    """A hooked language model whose layers are matrix recurrences (and attention).

    Supported: the families in `hooked_recurrent.families` (Qwen3.5, Mamba-2, ...).

    Hooks are added and removed exactly as in TransformerLens (``run_with_hooks``,
    ``run_with_cache``, ``hooks()``, ``add_hook``, ``reset_hooks``); ``model.hook_dict`` lists every
    hook point. Hook functions receive ``(activation, hook)`` and may return a replacement of the
    same shape and dtype. Edits of ``hook_write`` and ``hook_state`` propagate through the
    recurrence (later states and reads see them); see `hooked_recurrent.mixers.base`.

    Example:
        >>> model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")
        >>> tokens = torch.arange(12).reshape(2, 6)
        >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_write"))
        >>> cache["blocks.0.linear_attn.hook_write"].shape
        torch.Size([2, 6, 4, 16, 24])

    Args:
        hf_model: An HF causal LM of a supported family (e.g. ``Qwen3_5ForCausalLM``).
        tokenizer: Its tokenizer, or None to work on token tensors only.
        model_name: Name recorded in ``cfg.model_name``.
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, model_name: str | None = None) -> None:
        super().__init__()
        hf_model = text_model_of(hf_model)
        arch = family_of(hf_model)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.__dict__["architecture"] = arch
        self.__dict__["context"] = RunContext()
        name = model_name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.cfg: HookedRecurrentConfig = arch.describe(hf_model, name, tokenizer)

        self.hook_embed = HookPoint("batch pos d_model")
        self.blocks = nn.ModuleList(
            arch.build_block(layer, i, self.context) for i, layer in enumerate(arch.layers(hf_model))
        )
        self.ln_final = FinalNormHooks(arch.final_norm(hf_model), self.context, self.cfg.n_layers)
        self.cfg.attn_only = not any(hasattr(block, "hook_mlp_out") for block in self.blocks)
        self._install()
        self.setup()

    def setup(self) -> None:
        """Name every hook point (TransformerLens) and let each see the per-call run context."""
        super().setup()
        for hook_point in self.hook_dict.values():
            hook_point.__dict__["context"] = self.context

    def _install(self) -> None:
        embedding = self.architecture.embedding(self.hf_model)
        self.__dict__["_embed_hook"] = OutputHook(embedding, self.hook_embed)
        embedding.forward = self._embed_hook.forward
        self.architecture.final_norm(self.hf_model).forward = self.ln_final.forward
        for block in self.blocks:
            block.install()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        hf_model: nn.Module | None = None,
        tokenizer: Any = None,
        **hf_kwargs: Any,
    ) -> HookedRecurrentModel:
        """Load a model from a hub id, a local directory, or a built-in name.

        Hub ids and local directories take the same path (``AutoModelForCausalLM``); multimodal
        checkpoints (Qwen3.5, Qwen3.5-MoE) load as their text model; Mamba-2 checkpoints in
        mamba_ssm's format are converted. Built-in names (no download): ``stdlib:qwen3.5`` and
        ``stdlib:mamba2`` (small models trained on the Python standard library, shipped in the
        package), and ``tiny-random:<family>`` for every family, e.g. ``tiny-random:qwen3.5``
        (random weights, for tests).

        Args:
            name_or_path: Hub id, local directory or built-in name.
            device: Where to put the model (default: CUDA if available, else CPU).
            dtype: Parameter dtype (default float32).
            hf_model: An already built HF model to wrap instead of loading one.
            tokenizer: A tokenizer to use instead of the checkpoint's.
            **hf_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        dtype = check_dtype(dtype)
        if device is not None:
            check_device(device)
        if hf_model is None:
            hf_model, loaded_tokenizer = load_hf_model(name_or_path, dtype=dtype, **hf_kwargs)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        elif dtype is not None:
            hf_model = hf_model.to(dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = cls(hf_model.to(device), tokenizer=tokenizer, model_name=name_or_path)
        return model.eval()

    def to(self, *args: Any, **kwargs: Any) -> HookedRecurrentModel:
        out = super().to(*args, **kwargs)
        param = next(self.hf_model.parameters())
        self.cfg.device, self.cfg.dtype = str(param.device), param.dtype
        return out

    # ------------------------------------------------------------------ weights

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding (TransformerLens orientation: residual direction -> logits), with the
        multiplier muP models apply to the logits folded in (Granite 4, Falcon-H1)."""
        weight = self.hf_model.get_output_embeddings().weight.T
        multiplier = self.architecture.logit_multiplier(self.hf_model.config)
        return weight if multiplier == 1.0 else weight * multiplier

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding."""
        return self.hf_model.get_input_embeddings().weight

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The unembedding direction of each token (what a logit reads from the final residual).

        As TransformerLens: a string (one token), an int or a one-element tensor gives
        ``[d_model]``; a tensor of token ids gives ``[*tokens.shape, d_model]``.
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, Tensor) and tokens.numel() == 1:
            tokens = int(tokens.item())
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U.T[tokens.to(self.W_U.device)]

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """The output biases added to the residual stream before block ``layer``'s mixer (TransformerLens').

        Args:
            layer: The block whose input is meant (``n_layers``: the final residual).
            mlp_input: Also count block ``layer``'s mixer (the input of its MLP).
            include_mlp_biases: Count the MLPs' output biases too.
        """
        total = self.W_U.new_zeros(self.cfg.d_model)
        for l in range(layer + int(mlp_input)):
            block = self.blocks[l]
            parts = [self.mixer(l)]
            if include_mlp_biases and l < layer and hasattr(block, "mlp"):
                parts.append(block.mlp)
            for part in parts:
                bias = getattr(part, "b_O", getattr(part, "b_out", None))
                if bias is None:
                    raise ValueError(
                        f"block {l}'s {type(part).__name__} runs its HF module as it is: its output bias is not known"
                    )
                total = total + bias
        return total

    def mixer(self, layer: int) -> nn.Module:
        """The hook container of a layer's mixer (``blocks[layer].linear_attn / .attn / .mixer``)."""
        return getattr(self.blocks[layer], self.cfg.mixer_name(layer))

    # ------------------------------------------------------------------ tokens

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and this model has none; pass token tensors instead, or "
                "give one with HookedRecurrentModel.from_pretrained(..., tokenizer=...)."
            )
        return self.tokenizer

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokenize a string or a batch of strings (padded), as TransformerLens does."""
        return self._tokenize(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def _tokenize(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[Tensor, Tensor]:
        tokenizer = self._require_tokenizer("Tokenizing text")
        texts = [input] if isinstance(input, str) else list(input)
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend_bos:
            if tokenizer.bos_token is None:
                raise ValueError("prepend_bos=True, but the tokenizer has no BOS token.")
            texts = [tokenizer.bos_token + t for t in texts]
        old_side = tokenizer.padding_side
        tokenizer.padding_side = padding_side or old_side
        try:
            encoded = tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=truncate,
                add_special_tokens=False,
            )
        finally:
            tokenizer.padding_side = old_side
        tokens, mask = encoded["input_ids"], encoded["attention_mask"]
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int]) -> str | list[str]:
        """Decode tokens (a 1-D sequence gives a string, a batch a list of strings)."""
        tokenizer = self._require_tokenizer("to_string")
        if isinstance(tokens, Tensor) and tokens.dim() > 1:
            return [self.to_string(t) for t in tokens]
        return tokenizer.decode(tokens)

    def to_str_tokens(self, input: str | Tensor | list[int], prepend_bos: bool | None = None) -> list[str]:
        """Each token of a string or a 1-D token sequence, as a string."""
        tokenizer = self._require_tokenizer("to_str_tokens")
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        if isinstance(input, Tensor):
            if input.dim() > 1:
                if input.shape[0] != 1:
                    raise ValueError("to_str_tokens takes one sequence; index the batch first.")
                input = input[0]
            input = input.tolist()
        return [tokenizer.decode([t]) for t in input]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token."""
        tokens = self.to_tokens(string, prepend_bos=False)[0]
        if len(tokens) != 1:
            raise ValueError(f"{string!r} is {len(tokens)} tokens, not one: {self.to_str_tokens(tokens)}")
        return int(tokens[0])

    # ------------------------------------------------------------------ forward

    @overload
    def forward(
        self, input: ModelInput, return_type: Literal["logits"] = "logits", *,
        attention_mask: Int[Tensor, "batch pos"] | None = None, stop_at_layer: None = None,
        loss_per_token: bool = False, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None, position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: RecurrentCache | Literal[False] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]: ...

    @overload
    def forward(
        self, input: ModelInput, return_type: Literal["loss"], *,
        attention_mask: Int[Tensor, "batch pos"] | None = None, stop_at_layer: None = None,
        loss_per_token: bool = False, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None, position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: RecurrentCache | Literal[False] | None = None,
    ) -> Loss: ...

    @overload
    def forward(
        self, input: ModelInput, return_type: Literal["both"], *,
        attention_mask: Int[Tensor, "batch pos"] | None = None, stop_at_layer: None = None,
        loss_per_token: bool = False, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None, position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: RecurrentCache | Literal[False] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], Loss]: ...

    @overload
    def forward(
        self, input: ModelInput, return_type: None, *,
        attention_mask: Int[Tensor, "batch pos"] | None = None, stop_at_layer: None = None,
        loss_per_token: bool = False, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None, position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: RecurrentCache | Literal[False] | None = None,
    ) -> None: ...

    @overload
    def forward(
        self, input: ModelInput, return_type: Literal["logits", "loss", "both"] | None = "logits", *,
        attention_mask: Int[Tensor, "batch pos"] | None = None, stop_at_layer: int,
        loss_per_token: bool = False, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None, position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: None = None,
    ) -> Float[Tensor, "batch pos d_model"]: ...

    @overload
    def forward(
        self, input: ModelInput, return_type: Literal["logits", "loss", "both"] | None = "logits", *,
        attention_mask: Int[Tensor, "batch pos"] | None = None, stop_at_layer: None = None,
        loss_per_token: bool = False, prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None, position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: Literal[True],
    ) -> tuple[Any, RecurrentCache]: ...

    def forward(
        self,
        input: ModelInput,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        stop_at_layer: int | None = None,
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: RecurrentCache | bool | None = None,
    ) -> Tensor | tuple[Any, ...] | None:
        """Run the model (typed per ``return_type``, with ``@overload``s as in TransformerLens).

        Args:
            input: Text (tokenized with `to_tokens`) or a ``[batch, pos]`` token tensor.
            return_type: ``"logits"``, ``"loss"``, ``"both"`` (a ``(logits, loss)`` tuple) or None.
            attention_mask: 1 for real tokens, 0 for (left) padding; built from the tokenizer for text.
            stop_at_layer: Stop before this block and return the residual stream
                ``[batch, pos, d_model]`` (``n_layers``: before the final norm). Negative counts
                from the end.
            loss_per_token: Return the loss per position ``[batch, pos - 1]`` instead of the mean.
            prepend_bos: For text input, whether to prepend BOS (default: ``cfg.default_prepend_bos``).
            padding_side: For batches of text, which side to pad.
            position_ids: Passed to the HF model (rotary positions of attention layers).
            cache: A `RecurrentCache` to continue from and update in place (the input then holds
                the next tokens only; hooks see ``hook.start_position == cache.position``), or
                True to start a new one and return ``(output, cache)``.

        Returns:
            Logits ``[batch, pos, d_vocab]``, the loss, both, None, or the residual stream when
            ``stop_at_layer`` is given; with ``cache=True``, a tuple ``(that, cache)``.
        """
        tokens, attention_mask = self._inputs(input, attention_mask, prepend_bos, padding_side)
        if stop_at_layer is not None:
            n = self.cfg.n_layers
            if not -n <= stop_at_layer <= n:
                raise ValueError(
                    f"stop_at_layer={stop_at_layer} is out of range for {n} blocks: give -{n}..{n} "
                    f"({n}: the residual before the final norm), or None for the logits"
                )
            if stop_at_layer < 0:
                stop_at_layer += n
        if stop_at_layer is not None and cache is not None:
            raise ValueError("stop_at_layer cannot be combined with a cache (the cache would be left half-updated)")
        return_cache = cache is True
        if cache is True or cache is False:
            cache = RecurrentCache(self, tokens.shape[0]) if cache else None
        hf_kwargs: dict[str, Any] = {}
        if position_ids is not None:
            if not self.architecture.uses_position_ids:
                raise ValueError(f"{self.cfg.architecture} has no positional encoding; drop position_ids")
            hf_kwargs["position_ids"] = position_ids
        elif cache is not None and cache.position and self.architecture.uses_position_ids:
            # Positions continue the cache's (some HF models, as Bamba, count from 0 without them).
            start = cache.position
            hf_kwargs["position_ids"] = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        mask = attention_mask
        if cache is not None:
            cache.check_continuation(self, tokens.shape[0])
            mask = cache.mask_after(attention_mask, tokens.shape[1])
        self.context.stop_at_layer = stop_at_layer
        self.context.start_position = 0 if cache is None else cache.position
        padded = attention_mask is not None and not bool(attention_mask.all())
        self.context.padding_mask = attention_mask if padded else None
        self.__dict__["_call_tokens"] = tokens  # for SAEs spliced with exclude_special_tokens
        try:
            output = self.hf_model(
                input_ids=tokens,
                attention_mask=mask,
                cache=cache,
                use_cache=cache is not None,
                **hf_kwargs,
            )
        except StopForward as stop:
            return stop.residual
        except BaseException:
            if cache is not None:
                cache.mark_broken()
            raise
        finally:
            self.context.stop_at_layer = None
            self.context.start_position = 0
            self.context.padding_mask = None
            self.__dict__["_call_tokens"] = None
        if cache is not None:
            cache.advance(mask, tokens.shape[1])
        logits = output.logits
        if return_type == "logits":
            result = logits
        elif return_type is None:
            result = None
        else:
            loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
            result = loss if return_type == "loss" else (logits, loss)
        return (result, cache) if return_cache else result

    def generate(self, input: Any = "", max_new_tokens: int = 10, **kwargs: Any) -> Any:
        """Sample a continuation with hooks live at every step; see `hooked_recurrent.generation.generate`."""
        from .generation import generate

        return generate(self, input, max_new_tokens, **kwargs)

    def _inputs(
        self,
        input: Any,
        attention_mask: Tensor | None,
        prepend_bos: bool | None,
        padding_side: str | None,
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(input, str) or (isinstance(input, list) and all(isinstance(t, str) for t in input)):
            tokens, mask = self._tokenize(input, prepend_bos, padding_side)
            self._check_token_ids(tokens)
            return tokens, attention_mask if attention_mask is not None else mask
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be text or a token tensor, not {type(input).__name__}")
        tokens = input if input.dim() == 2 else input[None]
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token tensors must be integer, got {tokens.dtype}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have shape "
                f"{tuple(tokens.shape)}; give one mask entry per token."
            )
        self._check_token_ids(tokens)
        return tokens.to(self.cfg.device), None if attention_mask is None else attention_mask.to(self.cfg.device)

    def _check_token_ids(self, tokens: Tensor) -> None:
        """Refuse an empty input and ids outside the vocabulary (the embedding would fail or wrap)."""
        if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(
                f"the input has shape {tuple(tokens.shape)}: give [batch, pos] token ids with at least one "
                "sequence and one token (an empty string tokenizes to no token)"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.cfg.d_vocab:
            bad = low if low < 0 else high
            where = (tokens == bad).nonzero()[0].tolist()
            raise ValueError(
                f"token id {bad} at [batch, pos] = {where} is outside the vocabulary: ids must be in "
                f"0..{self.cfg.d_vocab - 1} for {self.cfg.model_name}"
            )

    @staticmethod
    def loss_fn(
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        per_token: bool = False,
    ) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
        """Next-token cross-entropy, ignoring padded positions."""
        if logits.shape[1] < 2:
            raise ValueError(
                f"the loss predicts each next token, so it needs at least 2 positions; the input has "
                f"{logits.shape[1]}. Give a longer sequence, or use return_type='logits'."
            )
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        loss = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
        if per_token:
            return loss
        if attention_mask is None:
            return loss.mean()
        mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(loss.dtype)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    # ------------------------------------------------------------------ hooks

    def _hook_point(self, name: str) -> TLHookPoint:
        """The hook point of a name, or an error listing the closest valid names."""
        # mod_dict, as TransformerLens looks names up there; a module that is not a hook point is refused.
        hook_point = getattr(self, "mod_dict", {}).get(name)
        if hook_point is None:
            hook_point = self._build_head_hooks(name)
        if isinstance(hook_point, TLHookPoint):
            return hook_point
        if hook_point is not None:
            inside = [n for n in self.hook_dict if n.startswith(name + ".")]
            what = f"{name!r} is a module, not a hook point." + (f" Its hook points: {', '.join(inside[:6])}." if inside else "")
        else:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
            what = f"No hook point named {name!r}." + (f" Closest valid names: {', '.join(close)}." if close else "")
        raise KeyError(f"{what} `model.hook_dict` lists all {len(self.hook_dict)} hook points.")

    def _build_head_hooks(self, name: str) -> TLHookPoint | None:
        """The per-head hook point ``name`` of a mixer with many heads, built on first use
        (`HeadHookList`); None if ``name`` is no such hook point."""
        match = _PER_HEAD_NAME.fullmatch(name)
        heads = getattr(self.mod_dict.get(match["mixer"]), "heads", None) if match else None
        if not isinstance(heads, HeadHookList) or int(match["head"]) >= len(heads):
            return None
        heads[int(match["head"])]
        self.setup()
        return self.hook_dict[name]

    def add_hook(  # type: ignore[override]
        self,
        name: str | Callable[[str], bool],
        hook: Callable,
        dir: Literal["fwd", "bwd"] = "fwd",  # noqa: A002 - TransformerLens' name
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach a hook by name or name filter, as TransformerLens does (unknown names are refused)."""
        if isinstance(name, str):
            self._hook_point(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]) -> None:  # noqa: A002
        self._hook_point(name)
        super()._enable_hook_with_name(name, hook, dir)

    def _names_filter(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        if names_filter is None:
            return lambda name: True
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple, set)):
            wanted = set(names_filter)
            for name in wanted:
                self._hook_point(name)
            return lambda name: name in wanted
        if callable(names_filter):
            return names_filter
        raise ValueError("names_filter must be a hook name, a list of hook names, or a function of a name")

    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: PosSlice = None,
    ) -> tuple[dict, list, list]:
        """Hooks that store activations, as TransformerLens' (read-only, so write/state points skip copies).

        ``pos_slice`` keeps some positions of each cached activation: the ``pos`` axis of a hook
        point is read from its named shape (``query_pos`` for attention patterns), so it is found
        whatever the tensor's rank; hook points without a named shape (an SAE's) have it second.
        """
        cache = {} if cache is None else cache
        wanted = self._names_filter(names_filter)
        pos_slice = Slice.unwrap(pos_slice)
        self.is_caching = True

        @observer
        def save(tensor: Tensor, hook: TLHookPoint, is_backward: bool = False) -> None:
            value = tensor.detach().to(device) if device is not None else tensor.detach()
            if remove_batch_dim:
                value = value[0]
            if pos_slice.mode != "identity":
                axis = position_axis(hook) - int(remove_batch_dim)
                if 0 <= axis < value.dim():
                    value = pos_slice.apply(value, dim=axis)
            cache[hook.name + ("_grad" if is_backward else "")] = value

        fwd = [(name, save) for name in self.hook_dict if wanted(name)]
        bwd = [(name, functools.partial(save, is_backward=True)) for name, _ in fwd] if incl_bwd else []
        return cache, fwd, bwd

    @overload
    def run_with_cache(
        self, *model_args: Any, return_cache_object: Literal[True] = True, **kwargs: Any
    ) -> tuple[Any, RecurrentActivationCache]: ...

    @overload
    def run_with_cache(
        self, *model_args: Any, return_cache_object: Literal[False], **kwargs: Any
    ) -> tuple[Any, dict[str, Tensor]]: ...

    def run_with_cache(
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, RecurrentActivationCache | dict[str, Tensor]]:
        """Run the model; return its output and a `RecurrentActivationCache` (TransformerLens' class, for hybrids).

        Takes TransformerLens' arguments (``names_filter``, ``device``, ``remove_batch_dim``,
        ``incl_bwd``, ``reset_hooks_end``, ``clear_contexts``, ``pos_slice``); the rest go to
        `forward`. Without ``names_filter`` every hook point is cached, the per-head views
        (``...heads.{h}.hook_write/hook_state``) included (of a mixer with more than 64 heads,
        those built: they are built when first named): writes and states are
        ``pos * heads * d_k * d_v`` numbers per layer, so prefer naming what you need.
        """
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            return out, RecurrentActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
        return out, cache_dict


def position_axis(hook: TLHookPoint) -> int:
    """Index of the ``pos`` axis (with the batch axis) of the activations a hook point carries."""
    dims = (getattr(hook, "shape", None) or "").split()
    for name in ("pos", "query_pos"):
        if name in dims:
            return dims.index(name)
    return 1
