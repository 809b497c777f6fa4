"""Splicing sparse autoencoders into the model, mirroring SAELens' ``HookedSAETransformer``.

An SAE is any SAELens-style module (duck-typed, so this package never imports SAELens): it has
``cfg.d_in``, ``cfg.metadata.hook_name`` (where it acts), optionally ``cfg.metadata.hook_head_index``
(one head of a write/state hook point), ``cfg.metadata.model_name``, ``cfg.d_k`` / ``cfg.d_v`` for
matrix SAEs, SAELens' six hook points, and ``forward(x, use_error_term=...)``.

A spliced SAE replaces the activation at its hook point by its reconstruction (plus the SAE's
error, with ``use_error_term=True``, so the output is exactly the input until a feature is
edited). A per-head SAE on ``hook_state`` / ``hook_write`` acts on its head's slice only, through
the per-head hook point ``heads.{h}.hook_state`` (only that head is materialised). The SAE's hook
points join the model's under the hook point it acts on: ``{hook}.hook_sae_acts_post`` with
``{hook}`` the per-head point for per-head SAEs; `HookedRecurrentModel.sae_hook_name` gives it.
Edits of a state SAE's reconstruction propagate through the recurrence like any state edit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["SpliceMixin", "SplicedSAE"]

_MATRIX_HOOK = re.compile(r"^(blocks\.\d+\.\w+)\.(hook_state|hook_write)$")
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output", "hook_sae_error")


@dataclass
class SplicedSAE:
    """An SAE in place: which hook point it acts on and how."""

    sae: Any
    site: str  # the hook point it acts on (per-head point for per-head SAEs)
    use_error_term: bool


class SpliceMixin:
    """``add_sae`` / ``saes()`` / ``run_with_saes`` / ``run_with_cache_with_saes`` / ``reset_saes``."""

    hook_dict: dict[str, Any]

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """``site -> SAE`` of every spliced SAE."""
        return {site: entry.sae for site, entry in self._spliced().items()}

    def _spliced(self) -> dict[str, SplicedSAE]:
        if "_saes" not in self.__dict__:
            self.__dict__["_saes"] = {}
        return self.__dict__["_saes"]

    def sae_site(self, sae: Any) -> str:
        """The hook point an SAE acts on (checked against the model; errors name the mismatch)."""
        meta = sae.cfg.metadata
        hook_name = getattr(meta, "hook_name", None)
        if not hook_name:
            raise ValueError("the SAE's cfg.metadata.hook_name is empty; set it to the hook it was trained on")
        self._hook_point(hook_name)  # unknown names list the closest ones
        head = getattr(meta, "hook_head_index", None)
        matrix = _MATRIX_HOOK.match(hook_name)
        if matrix is None:
            if head is not None:
                raise ValueError(f"hook_head_index={head} is only meaningful on hook_state / hook_write, not {hook_name}")
            return hook_name
        cfg = self.cfg
        d_k, d_v = getattr(sae.cfg, "d_k", None), getattr(sae.cfg, "d_v", None)
        if (d_k, d_v) != (None, None) and (d_k, d_v) != (cfg.d_k, cfg.d_v):
            raise ValueError(
                f"the SAE has d_k x d_v = {d_k} x {d_v} but {hook_name} carries {cfg.d_k} x {cfg.d_v} states; "
                "it was trained for another model"
            )
        if head is None:
            raise ValueError(
                f"{hook_name} holds every head; a matrix SAE acts on one: set cfg.metadata.hook_head_index"
            )
        if not 0 <= head < cfg.n_heads:
            raise ValueError(f"the SAE's head {head} is out of range: {hook_name} has heads 0..{cfg.n_heads - 1}")
        if sae.cfg.d_in != cfg.d_k * cfg.d_v:
            raise ValueError(f"the SAE's d_in {sae.cfg.d_in} != d_k * d_v = {cfg.d_k * cfg.d_v} of {hook_name}")
        return f"{matrix.group(1)}.heads.{head}.{matrix.group(2)}"

    def sae_hook_name(self, sae: Any, hook: str = "hook_sae_acts_post") -> str:
        """Full name of one of an SAE's hook points once spliced, e.g. for ``names_filter``."""
        return f"{self.sae_site(sae)}.{hook}"

    def add_sae(self, sae: Any, use_error_term: bool | None = None, strict: bool = True) -> None:
        """Splice an SAE in at its hook point (replacing one already there).

        Args:
            sae: The SAE (see the module docstring).
            use_error_term: Add the SAE's error back, so that the output equals the input until
                a feature is edited (default: the SAE's own ``use_error_term``).
            strict: Refuse an SAE whose ``metadata.model_name`` names another model.
        """
        trained_for = getattr(sae.cfg.metadata, "model_name", None)
        if strict and trained_for and trained_for != self.cfg.model_name:
            raise ValueError(
                f"the SAE was trained on {trained_for!r}, this model is {self.cfg.model_name!r}; "
                "pass strict=False if they are the same model under another name"
            )
        site = self.sae_site(sae)
        if site in self._spliced():
            self._remove_sae(site)
        error_term = bool(getattr(sae, "use_error_term", False)) if use_error_term is None else use_error_term
        point = self.hook_dict[site]

        def splice(activation, hook):  # noqa: ANN001, ANN202 - a TransformerLens hook
            inside = activation.to(getattr(sae, "dtype", activation.dtype))
            return sae(inside, use_error_term=error_term).to(activation.dtype)

        splice.__name__ = f"splice_{type(sae).__name__}"
        point.add_hook(splice, is_permanent=True)
        point.__dict__["_splice_handle"] = point.fwd_hooks[-1]
        for name in SAE_HOOKS:
            point.add_module(name, getattr(sae, name))
        self._spliced()[site] = SplicedSAE(sae, site, error_term)
        self.setup()

    def _remove_sae(self, site: str) -> None:
        entry = self._spliced().pop(site)
        point = self.hook_dict[site]
        handle = point.__dict__.pop("_splice_handle")
        handle.hook.remove()
        point.fwd_hooks.remove(handle)
        for name in SAE_HOOKS:
            del point._modules[name]
        entry.sae.setup()  # give the SAE's hook points back their own names

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove spliced SAEs (all, or those acting on the given sites)."""
        sites = list(self._spliced()) if act_names is None else ([act_names] if isinstance(act_names, str) else list(act_names))
        for site in sites:
            if site in self._spliced():
                self._remove_sae(site)
        self.setup()

    @contextmanager
    def saes(
        self, saes: Sequence[Any] = (), reset_saes_end: bool = True, use_error_term: bool | None = None
    ) -> Iterator[Any]:
        """Splice SAEs for the duration of a block; previously spliced SAEs come back after it."""
        previous: dict[str, SplicedSAE] = {}
        added: list[str] = []
        try:
            for sae in saes:
                site = self.sae_site(sae)
                if site in self._spliced():
                    previous[site] = self._spliced()[site]
                self.add_sae(sae, use_error_term=use_error_term)
                added.append(site)
            yield self
        finally:
            if reset_saes_end:
                for site in added:
                    if site in self._spliced():
                        self._remove_sae(site)
                for site, entry in previous.items():
                    self.add_sae(entry.sae, use_error_term=entry.use_error_term, strict=False)
                self.setup()

    def run_with_saes(
        self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, **model_kwargs: Any,
    ) -> Any:
        """Run the model with SAEs spliced in for this call."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, **kwargs: Any,
    ) -> Any:
        """``run_with_cache`` with SAEs spliced in (their activations are cached as ``{site}.hook_sae_*``)."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(
        self, *model_args: Any, saes: Sequence[Any] = (), reset_saes_end: bool = True,
        use_error_term: bool | None = None, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), **kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with SAEs spliced in."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **kwargs)
