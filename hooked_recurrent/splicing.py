"""Splicing sparse autoencoders into the model, with SAELens' ``HookedSAETransformer`` semantics.

An SAE is any SAELens SAE (duck-typed, so this package never imports SAELens): it has ``cfg.d_in``,
``cfg.metadata.hook_name`` (where it reads), optionally ``cfg.metadata.hook_name_out`` (where a
transcoder writes) and ``cfg.metadata.hook_head_index`` (one head of the hook point), SAELens'
hook points (``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``)
and ``encode`` / ``decode``. StandardSAE, TopK, JumpReLU, Gated, transcoders and WriteSAE all are.

What a spliced SAE does, as in SAELens: the activation is replaced by ``decode(encode(x))``; with
``use_error_term=True`` the SAE's error, computed in a clean pass with the SAE's hooks off, is added
back, so the output equals the input (here bit for bit) until a hook edits a feature. The error is
a constant for autograd: gradients flow through the reconstruction, so every spliced SAE's
parameters and every backward hook on its hook points receive them. ``use_error_term=None`` keeps
the SAE's own setting. The SAE's hook points join the model's as ``{key}.hook_sae_*``, with
``hook_sae_error`` and ``hook_sae_output`` owned by the splice (as SAELens' wrapper owns them).

Keys and per-head SAEs. An SAE is found (``acts_to_saes``), cached (``{key}.hook_sae_*``) and reset
(``reset_saes(key)``) by its key, which is its ``cfg.metadata.hook_name`` as in SAELens. A per-head
SAE (``hook_head_index = h``) acts on head ``h`` of its hook point only: on ``hook_state`` /
``hook_write`` through the per-head view ``heads.{h}.hook_*`` (only that head is materialised), on
any other hook point with a ``head`` axis (``attn.hook_z``, ``hook_recurrence_out``...) on that
slice. Several per-head SAEs on different heads of one hook point coexist; while they do, each is
keyed ``{hook_name}.heads.{h}`` (and its hook points are named under that key); a per-head SAE
alone on its hook point is keyed ``{hook_name}``. ``reset_saes(hook_name)`` removes every SAE on
that hook point, ``reset_saes(f"{hook_name}.heads.{h}")`` one. A second SAE on the same hook point
and head (or one without a head) replaces the first, as in SAELens.
``HookedRecurrentModel.sae_hook_name`` gives the full name of any of an SAE's hook points.

Edits of a state SAE's reconstruction propagate through the recurrence like any state edit.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .hook_points import HookPoint

__all__ = ["SpliceMixin", "SAESplice"]

logger = logging.getLogger(__name__)

_MATRIX_HOOK = re.compile(r"^(blocks\.\d+\.\w+)\.(hook_state|hook_write)$")
# The SAE's own hook points; hook_sae_error and hook_sae_output belong to the splice (as in SAELens).
SAE_OWN_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
# Tokenizer attributes naming the structural special tokens that exclude_special_tokens=True skips.
_SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id")
# Axis names of hook points that a per-head SAE's hook_head_index may index.
_HEAD_AXES = ("head", "key_head", "kv_head", "group")


class SAESplice(nn.Module):
    """One SAE in place (SAELens' ``_SAEWrapper``): its settings, its hook points, what it computes.

    Its children are the hook points that join the model under the SAE's key. The SAE itself is
    kept outside the module tree, so that its parameters are not the model's.

    Attributes:
        key: Name the SAE is found, cached and reset by (see the module docstring).
        hook_name: The hook point it reads (``cfg.metadata.hook_name``).
        head: ``hook_head_index`` (None: the whole activation).
        site: The hook point whose activation it replaces (the per-head view for per-head SAEs
            on ``hook_state`` / ``hook_write``; the output hook point for transcoders).
        head_axis: Axis of ``site``'s activation that ``head`` indexes (None: no slicing).
        use_error_term: Whether the SAE's error is added back.
        exclude_special_tokens: True (the tokenizer's BOS/EOS/PAD/SEP/CLS), a list of token ids,
            or False: positions holding these tokens keep the original activation.
    """

    def __init__(
        self,
        sae: Any,
        *,
        site: str,
        head_axis: int | None,
        shape: str | None,
        use_error_term: bool,
        exclude_special_tokens: bool | list[int] = False,
    ) -> None:
        super().__init__()
        meta = sae.cfg.metadata
        self.__dict__["_sae"] = sae
        self.__dict__["owner"] = None  # the model, for the tokens of the current call; set when spliced
        self.hook_name: str = meta.hook_name
        self.head: int | None = getattr(meta, "hook_head_index", None)
        self.site = site
        self.head_axis = head_axis
        self.use_error_term = use_error_term
        self.exclude_special_tokens = exclude_special_tokens
        self.key = self.hook_name
        self._captured_input: Tensor | None = None
        for name in SAE_OWN_HOOKS:
            self.add_module(name, getattr(sae, name))
        self.hook_sae_error = HookPoint(shape)
        self.hook_sae_output = HookPoint(shape)

    @property
    def sae(self) -> Any:
        """The spliced SAE."""
        return self.__dict__["_sae"]

    @property
    def output_hook_name(self) -> str:
        """Where the SAE writes: ``hook_name_out`` for transcoders, else ``hook_name``."""
        return getattr(self.sae.cfg.metadata, "hook_name_out", None) or self.hook_name

    def capture_input(self, x: Tensor) -> Tensor:
        """At a transcoder's input hook point: remember the activation, pass it on unchanged."""
        self._captured_input = x
        return x

    def __call__(self, activation: Tensor) -> Tensor:  # type: ignore[override]
        # Not a module call: the splice runs inside its site's forward, and must not add hooks of its own.
        return self.splice(activation)

    def splice(self, activation: Tensor) -> Tensor:
        """The site's activation with the SAE in place (on the head's slice only for per-head SAEs)."""
        if self.head_axis is None:
            return self._replace(activation, self._take_input(activation, None))
        h, axis = int(self.head), self.head_axis
        part = self._replace(activation.select(axis, h), self._take_input(activation, h))
        before, after = activation.narrow(axis, 0, h), activation.narrow(axis, h + 1, activation.shape[axis] - h - 1)
        return torch.cat([before, part.unsqueeze(axis), after], dim=axis)

    def _take_input(self, activation: Tensor, head: int | None) -> Tensor:
        source = activation if self._captured_input is None else self._captured_input
        self._captured_input = None
        return source if head is None or source is not activation else source.select(self.head_axis, head)

    def _replace(self, original: Tensor, sae_input: Tensor) -> Tensor:
        """``decode(encode(x))``, plus the clean error with the error term, as SAELens computes it."""
        sae = self.sae
        inside, restore = self._to_sae_layout(sae_input)
        acts = sae.encode(inside)
        recon = sae.decode(acts)
        mask = self._token_mask(original)
        if not self.use_error_term:
            out = restore(recon).to(original.dtype)
            if mask is not None:
                out = torch.where(mask, original, out)
            return self.hook_sae_output(out)
        with torch.no_grad():
            with sae_hooks_off(sae):
                clean = restore(sae.decode(sae.encode(inside)))
            # Computed so that with no edit the output is `original` bit for bit: recon == clean then.
            target = original.to(clean.dtype)
            error = target - clean
            if mask is not None:
                error = torch.where(mask, torch.zeros_like(error), error)
            seen = self.hook_sae_error(error.clone() if self.hook_sae_error.has_fwd_hooks() else error)
            value = target + (restore(recon).detach() - clean) + (seen - error)
        # Value of `value`; gradient of the reconstruction (recon - recon.detach() is exactly zero).
        out = (value + (restore(recon) - restore(recon).detach())).to(original.dtype)
        if mask is not None:
            out = torch.where(mask, original, out)
        return self.hook_sae_output(out)

    def _to_sae_layout(self, x: Tensor) -> tuple[Tensor, Any]:
        """The input as the SAE reads it, and the map from its output back to the site's layout.

        A stock SAE on a matrix hook point (trailing ``d_k x d_v``) reads flattened matrices, as a
        ``hook_z`` SAE reads flattened heads; matrix SAEs (``cfg.d_k``) and ``hook_z`` SAEs reshape
        themselves.
        """
        sae, d_in = self.sae, self.sae.cfg.d_in
        x = x.to(getattr(sae, "dtype", x.dtype))
        if x.shape[-1] == d_in or getattr(sae.cfg, "d_k", None) is not None:
            return x, _identity
        if x.dim() >= 2 and math.prod(x.shape[-2:]) == d_in:
            if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
                return x, _identity
            trailing = x.shape[-2:]
            return x.flatten(-2), lambda y: y.unflatten(-1, trailing)
        raise ValueError(
            f"The SAE at {self.key!r} has d_in={d_in}, but {self.site!r} carries "
            f"{tuple(x.shape)} per call (last axis {x.shape[-1]}); it was trained on another hook "
            "point or model."
        )

    def _token_mask(self, activation: Tensor) -> Tensor | None:
        """``[batch, pos, 1...]`` True where a special token keeps its original activation."""
        ids = self.exclude_special_tokens
        tokens = None if self.owner is None else self.owner.__dict__.get("_call_tokens")
        if ids is False or ids == [] or tokens is None:
            return None
        if ids is True:
            tokenizer = self.owner.tokenizer
            ids = sorted({getattr(tokenizer, a) for a in _SPECIAL_TOKEN_ATTRS if getattr(tokenizer, a, None) is not None})
        mask = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
        return mask.reshape(*mask.shape, *([1] * (activation.dim() - 2))).to(activation.device)


def _identity(x: Tensor) -> Tensor:
    return x


@contextmanager
def sae_hooks_off(sae: Any) -> Iterator[None]:
    """Run an SAE with its hook points replaced by identities (SAELens' clean pass)."""
    names = list(getattr(sae, "hook_dict", {}))
    hooks = {name: getattr(sae, name) for name in names}
    try:
        for name in names:
            setattr(sae, name, nn.Identity())
        yield
    finally:
        for name, hook in hooks.items():
            setattr(sae, name, hook)


class SpliceMixin:
    """``add_sae`` / ``saes()`` / ``run_with_saes`` / ``run_with_cache_with_saes`` / ``reset_saes``."""

    hook_dict: dict[str, Any]

    # ------------------------------------------------------------------ bookkeeping

    @property
    def _acts_to_saes(self) -> dict[str, SAESplice]:
        """``key -> SAESplice`` of every spliced SAE (SAELens' private dict of wrappers)."""
        return self.__dict__.setdefault("_splices", {})

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """``key -> SAE`` of every spliced SAE (keys: see `hooked_recurrent.splicing`)."""
        return {key: splice.sae for key, splice in self._acts_to_saes.items()}

    def sae_site(self, sae: Any) -> str:
        """The hook point whose activation an SAE replaces (checked against the model).

        Raises:
            KeyError: The SAE's hook name is not a hook point of this model (closest names listed).
            ValueError: The SAE does not fit the hook point (head out of range, wrong ``d_k x d_v``).
        """
        return self._placement(sae)[0]

    def _placement(self, sae: Any) -> tuple[str, int | None, str | None]:
        """``(site, axis of the head to slice or None, named shape of what the SAE replaces)``."""
        meta, cfg = sae.cfg.metadata, self.cfg
        hook_name = getattr(meta, "hook_name", None)
        if not hook_name:
            raise ValueError("the SAE's cfg.metadata.hook_name is empty; set it to the hook it was trained on")
        point = self._hook_point(hook_name)  # unknown names list the closest ones
        out_name = getattr(meta, "hook_name_out", None) or hook_name
        out_point = self._hook_point(out_name)
        matrix = _MATRIX_HOOK.match(hook_name)
        d_k, d_v = getattr(sae.cfg, "d_k", None), getattr(sae.cfg, "d_v", None)
        if matrix is not None and d_k is not None and (d_k, d_v) != (cfg.d_k, cfg.d_v):
            raise ValueError(
                f"the SAE has d_k x d_v = {d_k} x {d_v} but {hook_name} carries {cfg.d_k} x {cfg.d_v} states; "
                "it was trained for another model"
            )
        head = getattr(meta, "hook_head_index", None)
        if head is None:
            return out_name, None, out_point.shape
        if out_name != hook_name:
            raise ValueError(f"hook_head_index={head} is not supported for a transcoder ({hook_name} -> {out_name})")
        dims = (point.shape or "").split()
        axis = next((i for i, d in enumerate(dims) if d in _HEAD_AXES), None)
        if axis is None:
            raise ValueError(
                f"hook_head_index={head}, but {hook_name} carries [{point.shape}], with no head axis; "
                "set hook_head_index to None or use a hook point with heads"
            )
        n_heads = self._head_count(int(hook_name.split(".")[1]), dims[axis])
        if not 0 <= head < n_heads:
            raise ValueError(f"the SAE's head {head} is out of range: {hook_name} has heads 0..{n_heads - 1}")
        if matrix is not None:
            return f"{matrix.group(1)}.heads.{head}.{matrix.group(2)}", None, "batch pos d_k d_v"
        return hook_name, axis, " ".join(dims[:axis] + dims[axis + 1 :])

    def _head_count(self, layer: int, axis: str) -> int:
        cfg = self.cfg
        if axis == "head":
            return cfg.n_attn_heads if cfg.layer_types[layer] == "attention" else cfg.n_heads
        return {"key_head": cfg.n_key_heads, "kv_head": cfg.n_kv_heads, "group": cfg.n_groups}[axis]

    @staticmethod
    def _key_for(hook_name: str, head: int | None, spliced: Sequence[SAESplice]) -> str:
        """``hook_name``, or ``{hook_name}.heads.{head}`` while SAEs on other heads share the hook point."""
        shared = head is not None and any(s.hook_name == hook_name and s.head not in (None, head) for s in spliced)
        return f"{hook_name}.heads.{head}" if shared else hook_name

    @staticmethod
    def _displaces(splice: SAESplice, meta: Any) -> bool:
        """Whether an SAE with this metadata replaces a spliced one (same hook point, same or no head)."""
        head = getattr(meta, "hook_head_index", None)
        return splice.hook_name == meta.hook_name and (head is None or splice.head is None or splice.head == head)

    def sae_hook_name(self, sae: Any, hook: str = "hook_sae_acts_post") -> str:
        """Full name of one of an SAE's hook points: as spliced now, or as it would be once added."""
        for key, splice in self._acts_to_saes.items():
            if splice.sae is sae:
                return f"{key}.{hook}"
        meta = sae.cfg.metadata
        staying = [s for s in self._acts_to_saes.values() if not self._displaces(s, meta)]
        return f"{self._key_for(meta.hook_name, getattr(meta, 'hook_head_index', None), staying)}.{hook}"

    # ------------------------------------------------------------------ adding and removing

    def add_sae(
        self,
        sae: Any,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        strict: bool = True,
    ) -> None:
        """Splice an SAE in at its hook point, until `reset_saes` (replacing one already there).

        As in SAELens, an SAE whose hook name is not a hook point of this model is skipped with a
        warning (which lists the closest names).

        Args:
            sae: Any SAELens SAE or transcoder (see the module docstring).
            use_error_term: Add the SAE's error back, so that the output equals the input until
                a feature is edited. None keeps the SAE's own ``use_error_term``.
            exclude_special_tokens: Leave positions holding special tokens untouched: True for the
                tokenizer's BOS/EOS/PAD/SEP/CLS, or a list of token ids.
            strict: Refuse an SAE whose ``metadata.model_name`` names another model.
        """
        meta = sae.cfg.metadata
        for name in (meta.hook_name, getattr(meta, "hook_name_out", None)):
            try:
                if name:
                    self._hook_point(name)
            except KeyError as missing:
                logger.warning("No hook found for %s. Skipping. %s", name, missing.args[0])
                return
        trained_for = getattr(meta, "model_name", None)
        if strict and trained_for and trained_for != self.cfg.model_name:
            raise ValueError(
                f"the SAE was trained on {trained_for!r}, this model is {self.cfg.model_name!r}; "
                "pass strict=False if they are the same model under another name"
            )
        site, head_axis, shape = self._placement(sae)
        self._remove([k for k, s in self._acts_to_saes.items() if self._displaces(s, meta)], rename=False)
        error_term = bool(getattr(sae, "use_error_term", False)) if use_error_term is None else use_error_term
        splice = SAESplice(
            sae, site=site, head_axis=head_axis, shape=shape, use_error_term=error_term,
            exclude_special_tokens=exclude_special_tokens,
        )
        splice.__dict__["owner"] = self
        if splice.output_hook_name != splice.hook_name:
            self.hook_dict[splice.hook_name].splices.append(splice.capture_input)
        self._hook_point(site).splices.append(splice)  # builds a per-head hook point not built yet
        self._acts_to_saes[f"new:{id(splice)}"] = splice  # a placeholder key: _rename gives the real one
        self._rename(splice.hook_name)

    def _rename(self, hook_name: str) -> None:
        """Key the SAEs reading ``hook_name`` and hang their hook points under their keys."""
        group = [s for s in self._acts_to_saes.values() if s.hook_name == hook_name]
        keyed = {k: s for k, s in self._acts_to_saes.items() if s.hook_name != hook_name}
        for splice in group:
            self._unhang(splice)
            splice.key = self._key_for(hook_name, splice.head, group)
            keyed[splice.key] = splice
            owner = self.mod_dict[splice.output_hook_name]
            if splice.key == hook_name:
                for name, module in splice.named_children():
                    owner.add_module(name, module)
            else:
                if "heads" not in owner._modules:
                    owner.add_module("heads", nn.ModuleDict())
                owner.heads[str(splice.head)] = splice
        self.__dict__["_splices"] = keyed
        self.setup()

    def _unhang(self, splice: SAESplice) -> None:
        """Take an SAE's hook points out of the model's module tree."""
        owner = self.mod_dict[splice.output_hook_name]
        for name, module in list(owner.named_children()):
            if name == "heads" and str(splice.head) in module._modules and module[str(splice.head)] is splice:
                del module[str(splice.head)]
                if not len(module):
                    del owner._modules["heads"]
            elif any(module is child for child in splice.children()):
                del owner._modules[name]

    def _remove(self, keys: Sequence[str], rename: bool = True) -> None:
        """Unsplice the SAEs with these keys (and re-key the SAEs left on their hook points)."""
        hook_names = set()
        for key in keys:
            splice = self._acts_to_saes.pop(key)
            hook_names.add(splice.hook_name)
            self._unhang(splice)
            self.hook_dict[splice.site].splices.remove(splice)
            if splice.output_hook_name != splice.hook_name:
                self.hook_dict[splice.hook_name].splices.remove(splice.capture_input)
            if hasattr(splice.sae, "setup"):
                splice.sae.setup()  # give the SAE's hook points back their own names
        if rename:
            for hook_name in hook_names:
                self._rename(hook_name)
        self.setup()

    def _reset_sae(self, act_name: str, prev_sae: Any = None) -> None:
        """Remove the SAE keyed ``act_name`` (every SAE on the hook point, given a hook name).

        Args:
            act_name: A key of `acts_to_saes`, or a hook name.
            prev_sae: An SAE, or an `SAESplice` (whose settings come with it), to splice in its place.
        """
        keys = [k for k, s in self._acts_to_saes.items() if act_name in (k, s.hook_name)]
        if not keys:
            logger.warning(
                "No SAE is attached to %s. There's nothing to reset. Attached: %s",
                act_name, ", ".join(self._acts_to_saes) or "none",
            )
        self._remove(keys)
        if isinstance(prev_sae, SAESplice):
            self.add_sae(prev_sae.sae, prev_sae.use_error_term, prev_sae.exclude_special_tokens, strict=False)
        elif prev_sae is not None:
            self.add_sae(prev_sae, strict=False)

    def reset_saes(self, act_names: str | Sequence[str] | None = None, prev_saes: Sequence[Any] | None = None) -> None:
        """Remove spliced SAEs: all, or those with the given keys or hook names.

        Args:
            act_names: Keys of `acts_to_saes` or hook names (a hook name removes every SAE on it).
            prev_saes: SAEs to splice back in their place, one per name (None: none).
        """
        names = list(self._acts_to_saes) if act_names is None else [act_names] if isinstance(act_names, str) else list(act_names)
        prev = [None] * len(names) if prev_saes is None else list(prev_saes)
        if len(prev) != len(names):
            raise ValueError(f"reset_saes got {len(names)} names but {len(prev)} prev_saes; give one per name")
        for name, sae in zip(names, prev):
            self._reset_sae(name, sae)

    # ------------------------------------------------------------------ scoped splicing

    @contextmanager
    def saes(
        self,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
    ) -> Iterator[Any]:
        """Splice SAEs for the duration of a block; the SAEs they displaced come back after it."""
        saes = [saes] if hasattr(saes, "cfg") else list(saes)
        before = list(self._acts_to_saes.values())
        added: list[SAESplice] = []
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
                added += [s for s in self._acts_to_saes.values() if s.sae is sae and s not in added]
            yield self
        finally:
            if reset_saes_end:
                self._remove([k for k, s in self._acts_to_saes.items() if any(s is a for a in added)])
                for splice in before:
                    if not any(s is splice for s in self._acts_to_saes.values()):
                        self.add_sae(splice.sae, splice.use_error_term, splice.exclude_special_tokens, strict=False)

    def run_with_saes(
        self, *model_args: Any, saes: Any | Sequence[Any] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False, **model_kwargs: Any,
    ) -> Any:
        """Run the model with SAEs spliced in for this call."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Any | Sequence[Any] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False, **kwargs: Any,
    ) -> Any:
        """``run_with_cache`` with SAEs spliced in (their activations are cached as ``{key}.hook_sae_*``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(
        self, *model_args: Any, saes: Any | Sequence[Any] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
        fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
        clear_contexts: bool = False, **model_kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with SAEs spliced in."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_hooks(
                *model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks),
                reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **model_kwargs,
            )
