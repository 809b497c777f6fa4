"""RecurrentCache: the model's memory after a prefix, to continue, fork, edit, save and load.

Per layer it holds the recurrent state and the short-convolution state (matrix-recurrent layers),
the keys and values (attention layers), both (layers that run a recurrence and attention side by
side, as Falcon-H1's) or nothing (layers that are an MLP only, as some of NemotronH's), plus the
position it has reached and the attention mask seen so far. It is a transformers ``DynamicCache`` (the HF model reads and updates it as
usual), with what interpretability work needs on top: independent copies, per-layer and per-head
state access in the key-by-value layout of docs/design.md §2, batch tiling for forks, and safetensors files.

Example:
    >>> import torch
    >>> from hooked_recurrent import HookedRecurrentModel, RecurrentCache
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")
    >>> tokens = torch.arange(3, 23)[None]
    >>> cache = RecurrentCache(model, batch_size=1)
    >>> _ = model(tokens[:, :12], cache=cache)
    >>> cache.position, tuple(cache.state(0).shape)
    (12, (1, 4, 16, 24))
    >>> fork = cache.clone()
    >>> fork.set_state(0, torch.zeros(16, 24), head=2)     # edits the copy only
    >>> torch.testing.assert_close(model(tokens[:, 12:], cache=cache), model(tokens, )[:, 12:])
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

from .files import atomic_save_safetensors

if TYPE_CHECKING:
    from .model import HookedRecurrentModel

__all__ = ["RecurrentCache", "model_signature"]

_FORMAT = "hooked_recurrent.RecurrentCache/1"


def model_signature(model: HookedRecurrentModel) -> dict[str, Any]:
    """What a cache must agree with to be continued by a model."""
    cfg = model.cfg
    return {
        "architecture": cfg.architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "layer_types": list(cfg.layer_types),
        "n_heads": cfg.n_heads,
        "d_k": cfg.d_k,
        "d_v": cfg.d_v,
        "model_name": cfg.model_name,
    }


class RecurrentCache(DynamicCache):
    """A model's cache after some tokens; continue it with ``model(tokens, cache=cache)``.

    Args:
        model: The model it belongs to (only its description and identity are kept).
        batch_size: Number of sequences.

    Attributes:
        position: Tokens consumed so far (the absolute position of the next token).
        batch_size: Number of sequences.
        attention_mask: ``[batch, position]`` mask of the tokens consumed (1 = real token).
    """

    def __new__(cls, model: HookedRecurrentModel | None = None, *args: Any, **kwargs: Any) -> RecurrentCache:
        # A family whose HF model demands its own cache class (MiniMax) names a subclass of both.
        family_cache = getattr(getattr(model, "architecture", None), "cache_class", None)
        if cls is RecurrentCache and family_cache is not None:
            cls = family_cache
        return super().__new__(cls)

    def __init__(self, model: HookedRecurrentModel, batch_size: int) -> None:
        # Called by name: a family's cache class puts its HF cache class (whose __init__ takes no
        # config) between this class and DynamicCache.
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: a cache holds one or more sequences; give a whole number >= 1")
        DynamicCache.__init__(self, config=model.hf_model.config)
        self.position = 0
        self._batch_size = batch_size
        self.attention_mask: Int[Tensor, "batch pos"] | None = None
        self.from_layer = 0  # the layers below are shared with another cache (`select`), not held
        # Set on a copy nobody else reads (a fork's): a forward may then update its recurrent states in
        # place instead of allocating new ones (a fork's batch of states is ~100 MB).
        self.in_place = False
        self.signature = model_signature(model)
        self.owner_id = id(model.hf_model)
        self.filled_with = (model.cfg.dtype, str(model.cfg.device))  # the model's dtype and device
        self._kinds = [model.architecture.layer_kind(kind) for kind in model.cfg.layer_types]

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # ------------------------------------------------------------------ bookkeeping

    def mask_after(self, new_mask: Tensor | None, n_new: int) -> Tensor | None:
        """The attention mask over all positions once ``n_new`` more tokens are consumed."""
        if new_mask is None and self.attention_mask is None:
            return None
        device = (new_mask if new_mask is not None else self.attention_mask).device
        past = self.attention_mask
        if past is None:
            past = torch.ones(self.batch_size, self.position, dtype=torch.long, device=device)
        if new_mask is None:
            new_mask = torch.ones(self.batch_size, n_new, dtype=past.dtype, device=device)
        return torch.cat([past.to(device), new_mask.to(past.dtype)], dim=1)

    def advance(self, full_mask: Tensor | None, n_new: int) -> None:
        """Record that ``n_new`` tokens were consumed (called by the model after a forward)."""
        self.position += n_new
        self.attention_mask = full_mask

    def mark_broken(self) -> None:
        """A forward using this cache raised midway: some layers saw the new tokens, others did not."""
        self.broken = True

    def check_continuation(self, model: HookedRecurrentModel, batch_size: int) -> None:
        """Raise if this cache cannot be continued by ``model`` on ``batch_size`` sequences."""
        if getattr(self, "broken", False):
            raise ValueError(
                "This cache is incomplete: a forward that used it raised midway. Continue from a clone "
                "made before that call (cache.clone()), or start a new RecurrentCache."
            )
        if id(model.hf_model) != self.owner_id or model_signature(model) != self.signature:
            raise ValueError(
                f"This cache was filled by another model ({self.signature['model_name']}, "
                f"{self.signature['architecture']}); continue it with that model, or start a new "
                "RecurrentCache(model, batch_size) for this one."
            )
        if batch_size != self.batch_size:
            raise ValueError(
                f"This cache holds {self.batch_size} sequence(s) but the input has batch size {batch_size}; "
                "use cache.repeat(n) to tile it, or a cache built for this batch."
            )
        first, start = self.from_layer, model.context.start_at_layer or 0
        if first != start:
            raise ValueError(
                f"This cache holds the memory of layers {first} and up (cache.select(rows, from_layer={first})) "
                f"but the forward runs from layer {start}: continue it with hooked_recurrent.fork.run_from_layer "
                f"from layer {first}, or select from a whole cache without from_layer."
            )
        now = (model.cfg.dtype, str(model.cfg.device))
        if self.position > 0 and now != self.filled_with:
            (dtype, device), (new_dtype, new_device) = self.filled_with, now
            raise ValueError(
                f"This cache was filled by the model in {dtype} on {device}, and the model now runs in "
                f"{new_dtype} on {new_device}; move the model back (model.to(...)) to continue it, or run "
                "the prefix again into a new RecurrentCache."
            )
        self.filled_with = now

    # ------------------------------------------------------------------ state access

    def _layer(self, layer: int) -> Any:
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"layer {layer} is out of range for a cache of {len(self.layers)} layers")
        return self.layers[layer]

    def _linear(self, layer: int) -> Any:
        entry = self._layer(layer)
        if not isinstance(entry, LinearAttentionCacheLayerMixin):
            raise ValueError(
                f"layer {layer} holds no recurrent state; use cache.keys(layer) / cache.values(layer) for attention"
            )
        if not entry.has_previous_state[0]:
            raise ValueError(f"layer {layer} holds no state yet; run some tokens with this cache first")
        return entry

    def state(self, layer: int) -> Float[Tensor, "batch head d_k d_v"]:
        """The recurrent state of a layer, key-by-value (a view; edit it with `set_state`)."""
        return self._kinds[layer].hooked_state(self._linear(layer).recurrent_states[0])

    def set_state(
        self,
        layer: int,
        value: Float[Tensor, "... d_k d_v"],
        head: int | None = None,
    ) -> None:
        """Replace a layer's state, or one head's (broadcast over the batch if given per head).

        Args:
            layer: Layer index.
            value: ``[batch, head, d_k, d_v]`` (all heads) or ``[d_k, d_v]`` / ``[batch, d_k, d_v]`` (one head).
            head: Head index, or None for all heads.
        """
        target = self.state(layer)
        n_heads = target.shape[1]
        if head is not None and not 0 <= head < n_heads:
            raise IndexError(f"head {head} is out of range: layer {layer} has {n_heads} heads")
        slot = target if head is None else target[:, head]
        if value.shape[-2:] != slot.shape[-2:]:
            raise ValueError(
                f"a state of layer {layer} is [d_k, d_v] = {tuple(slot.shape[-2:])}, got {tuple(value.shape)}"
            )
        slot.copy_(value.to(slot.dtype).expand_as(slot))

    def conv_state(self, layer: int) -> Float[Tensor, "batch channel kernel"] | None:
        """The short convolution's state of a matrix-recurrent layer (its last inputs; None if it has none)."""
        return self._linear(layer).conv_states[0]

    def keys(self, layer: int) -> Float[Tensor, "batch kv_head pos d_head"]:
        """Cached keys of an attention layer."""
        entry = self._layer(layer)
        if not isinstance(entry, CacheLayerMixin):
            raise ValueError(f"layer {layer} holds no keys and values; use cache.state(layer) for a recurrent layer")
        return entry.keys

    def values(self, layer: int) -> Float[Tensor, "batch kv_head pos d_head"]:
        """Cached values of an attention layer."""
        self.keys(layer)
        return self._layer(layer).values

    # ------------------------------------------------------------------ copies

    def clone(self) -> RecurrentCache:
        """An independent copy: edits to one never reach the other.

        Tensors are copied with ``Tensor.clone``, so a cache filled under autograd clones too (its
        copies stay differentiable, as a deep copy of graph tensors cannot).
        """
        memo: dict[int, Any] = {}
        for entry in self.layers:
            for value in vars(entry).values():
                for tensor in value.values() if isinstance(value, dict) else [value]:
                    if isinstance(tensor, Tensor):
                        memo[id(tensor)] = tensor.clone()
        if self.attention_mask is not None:
            memo[id(self.attention_mask)] = self.attention_mask.clone()
        return copy.deepcopy(self, memo)

    def _map(self, fn: Callable[[Tensor], Tensor], from_layer: int = 0) -> RecurrentCache:
        """A copy whose batch-indexed tensors are ``fn`` of this cache's (``fn`` copies), other tensors
        cloned; the layers below ``from_layer`` are shared with this cache, not copied."""
        batched: set[int] = set()
        for entry in self.layers:
            if isinstance(entry, LinearAttentionCacheLayerMixin):
                for store in (entry.conv_states, entry.recurrent_states):
                    batched.update(id(value) for value in store.values() if isinstance(value, Tensor))
            if _has_keys(entry):
                batched.update((id(entry.keys), id(entry.values)))
        # One pass: each tensor goes straight to its copy (deepcopy takes it from the memo), instead
        # of a clone of the whole cache followed by ``fn`` of each clone.
        memo: dict[int, Any] = {}
        for index, entry in enumerate(self.layers):
            for value in vars(entry).values():
                for tensor in value.values() if isinstance(value, dict) else [value]:
                    if isinstance(tensor, Tensor) and id(tensor) not in memo:
                        if index < from_layer:
                            memo[id(tensor)] = tensor
                        else:
                            memo[id(tensor)] = fn(tensor) if id(tensor) in batched else tensor.clone()
        if self.attention_mask is not None:
            memo[id(self.attention_mask)] = fn(self.attention_mask)
        out = copy.deepcopy(self, memo)
        out.from_layer = max(from_layer, self.from_layer)
        return out

    def repeat(self, n: int) -> RecurrentCache:
        """A copy with the batch tiled ``n`` times (copy ``i`` holds rows ``i*batch .. (i+1)*batch``)."""
        out = self._map(lambda x: x.repeat(n, *([1] * (x.dim() - 1))))
        out._batch_size = self.batch_size * n
        return out

    @classmethod
    def cat(cls, caches: list[RecurrentCache]) -> RecurrentCache:
        """Stack the batches of caches that reached the same position with the same model."""
        if not caches:
            raise ValueError("RecurrentCache.cat needs at least one cache")
        first = caches[0]
        for other in caches[1:]:
            if other.signature != first.signature or other.owner_id != first.owner_id:
                raise ValueError("cannot concatenate caches filled by different models")
            if other.position != first.position:
                raise ValueError(
                    f"cannot concatenate caches at positions {first.position} and {other.position}; "
                    "run them to the same position first"
                )
        out = first.clone()
        for index, entry in enumerate(out.layers):
            parts = [c.layers[index] for c in caches]
            if isinstance(entry, LinearAttentionCacheLayerMixin):
                for attr in ("conv_states", "recurrent_states"):
                    store = getattr(entry, attr)
                    for key, value in store.items():
                        if isinstance(value, Tensor):
                            store[key] = torch.cat([getattr(part, attr)[key] for part in parts])
            if _has_keys(entry):
                entry.keys = torch.cat([part.keys for part in parts])
                entry.values = torch.cat([part.values for part in parts])
        if any(c.attention_mask is not None for c in caches):
            device = next(c.attention_mask for c in caches if c.attention_mask is not None).device
            out.attention_mask = torch.cat([
                c.attention_mask.to(device) if c.attention_mask is not None
                else torch.ones(c.batch_size, c.position, dtype=torch.long, device=device)
                for c in caches
            ])  # fmt: skip
        out._batch_size = sum(c.batch_size for c in caches)
        return out

    def select(self, rows: Tensor | list[int], from_layer: int = 0) -> RecurrentCache:
        """A copy with only some sequences of the batch (in any order, repeats allowed).

        Args:
            rows: The sequences to keep.
            from_layer: Copy only the memory of this layer and the layers after it. The copy
                shares the layers below with this cache (neither copied nor ever updated through
                the copy), so only `hooked_recurrent.fork.run_from_layer` from that layer continues
                it: for conditions whose edits all sit at or above it, the layers below compute the
                same for every condition and are run once, for the original batch.
        """
        if not 0 <= from_layer < len(self.layers):
            raise ValueError(f"from_layer={from_layer} is out of range for a cache of {len(self.layers)} layers")
        index = torch.as_tensor(rows, dtype=torch.long)
        out = self._map(lambda x: x[index.to(x.device)], from_layer)
        out._batch_size = len(index)
        return out

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (atomically: a crash leaves no partial file)."""
        if self.from_layer:
            raise ValueError(
                f"this cache holds only layers {self.from_layer} and up (select(..., from_layer=...)); "
                "save the whole cache it was selected from"
            )
        tensors: dict[str, Tensor] = {}
        layers_meta = []
        for i, entry in enumerate(self.layers):
            linear, attention = _parts(entry)
            started = []
            if linear:
                started.append(bool(entry.has_previous_state[0]))
                if started[-1]:
                    tensors[f"{i}.recurrent"] = entry.recurrent_states[0]
                    if entry.conv_states[0] is not None:  # mixers without a short convolution have none
                        tensors[f"{i}.conv"] = entry.conv_states[0]
            if attention:
                started.append(_has_keys(entry))
                if started[-1]:
                    tensors[f"{i}.keys"], tensors[f"{i}.values"] = entry.keys, entry.values
            layers_meta.append({"kind": _KIND_NAMES[linear, attention], "started": all(started)})
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask
        meta = {
            "format": _FORMAT,
            "position": self.position,
            "batch_size": self.batch_size,
            "signature": self.signature,
            "layers": layers_meta,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_save_safetensors(tensors, path, metadata={"hooked_recurrent": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: HookedRecurrentModel) -> RecurrentCache:
        """Read a cache saved with `save`, for ``model`` (which must be the model it was saved from)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("hooked_recurrent")
        if raw is None:
            raise ValueError(f"{path} is not a RecurrentCache file (no hooked_recurrent metadata)")
        meta = json.loads(raw)
        if meta["signature"] != model_signature(model):
            raise ValueError(
                f"{path} was saved from {meta['signature']['model_name']} ({meta['signature']['architecture']}), "
                f"not from {model.cfg.model_name}; load it with that model."
            )
        tensors = load_file(str(path), device=str(model.cfg.device))
        cache = cls(model, meta["batch_size"])
        cache.position = meta["position"]
        cache.attention_mask = tensors.get("attention_mask")
        for i, (entry, info) in enumerate(zip(cache.layers, meta["layers"])):
            if not info["started"]:
                continue
            if info["kind"] in ("linear", "hybrid"):
                recurrent = entry.recurrent_states[0] = tensors[f"{i}.recurrent"]
                entry.is_recurrent_states_initialized[0] = entry.has_previous_state[0] = True
                conv = tensors.get(f"{i}.conv")
                if conv is not None:
                    entry.conv_states[0], entry.conv_kernel_size[0] = conv, conv.shape[-1]
                    entry.is_conv_states_initialized[0] = True
                entry.dtype, entry.device = recurrent.dtype, recurrent.device
            if info["kind"] in ("attention", "hybrid"):
                entry.keys, entry.values = tensors[f"{i}.keys"], tensors[f"{i}.values"]
                entry.is_initialized, entry.device = True, entry.keys.device
        return cache


# How `save` names a layer's cache by its parts (linear-attention state, attention keys and values).
_KIND_NAMES = {(True, False): "linear", (False, True): "attention", (True, True): "hybrid", (False, False): "none"}


def _parts(entry: Any) -> tuple[bool, bool]:
    """Whether an HF cache layer holds a recurrent state, and whether it holds keys and values
    (a hybrid layer holds both, a dummy layer, of a layer that is an MLP only, neither)."""
    return isinstance(entry, LinearAttentionCacheLayerMixin), isinstance(entry, CacheLayerMixin)


def _has_keys(entry: Any) -> bool:
    """Whether an HF cache layer holds keys and values already."""
    return isinstance(entry, CacheLayerMixin) and bool(entry.is_initialized) and entry.keys is not None
