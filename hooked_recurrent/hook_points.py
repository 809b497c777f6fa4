"""Hook points that check what hooks return.

A thin layer over TransformerLens' `HookPoint`: every hook point knows the named shape of the
activation it carries, so a hook that returns the wrong shape, dtype or device fails at once with
an error that names the hook point and the expected shape, instead of failing three modules later.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from transformer_lens.hook_points import HookPoint as _TLHookPoint

__all__ = ["HookPoint", "observer", "is_observer"]

_OBSERVER_FLAG = "_hooked_recurrent_observer"


def observer(fn: Callable) -> Callable:
    """Mark a hook function as read-only (it never edits the activation it is given).

    Hook points whose edits must be detected (writes, states) skip the defensive copy they
    otherwise make before calling a hook. The caching hooks of `run_with_cache` are observers.
    """
    setattr(fn, _OBSERVER_FLAG, True)
    return fn


def is_observer(fn: Callable) -> bool:
    """Whether `fn` (or the function a `functools.partial` wraps) was marked with `observer`."""
    while isinstance(fn, functools.partial):
        if getattr(fn, _OBSERVER_FLAG, False):
            return True
        fn = fn.func
    return bool(getattr(fn, _OBSERVER_FLAG, False))


class HookPoint(_TLHookPoint):
    """A TransformerLens hook point that validates replacements.

    Args:
        shape: The named dimensions of the activation, e.g. ``"batch pos head d_k d_v"``. Used in
            error messages and documentation only.

    Example:
        >>> import torch
        >>> hp = HookPoint("batch pos d_model")
        >>> hp.name = "blocks.0.hook_resid_pre"
        >>> hp.add_hook(lambda x, hook: x[:, :1])
        >>> hp(torch.zeros(2, 3, 4))
        Traceback (most recent call last):
        ...
        ValueError: The hook <lambda> on 'blocks.0.hook_resid_pre' returned shape (2, 1, 4); this hook point carries [batch pos d_model] = (2, 3, 4) of dtype torch.float32. Return a tensor of the same shape and dtype, or None to keep the activation.
    """

    def __init__(self, shape: str | None = None):
        super().__init__()
        self.shape = shape
        self.__dict__["context"] = None  # the owning model's RunContext, set by the model
        # Spliced SAEs (`hooked_recurrent.splicing`): part of the computation, like SAELens'
        # wrapper in place of a hook point, so removing every hook never unsplices them.
        self.__dict__["splices"] = []

    def forward(self, x: Tensor) -> Tensor:
        """The activation, through the SAEs spliced here (if any), before the hooks run."""
        for splice in self.splices:
            x = splice(x)
        return x

    @property
    def start_position(self) -> int:
        """Absolute position of index 0 of the ``pos`` axis in the current call.

        Non-zero when the model continues from a cache or generates (one position per step): an
        activation's position ``p`` is the sequence's position ``hook.start_position + p``.
        """
        return 0 if self.context is None else self.context.start_position

    def add_hook(
        self,
        hook: Callable,
        dir: Literal["fwd", "bwd"] = "fwd",  # noqa: A002 - TransformerLens' name
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
        alias_names: list[str] | None = None,
    ) -> None:
        """Attach a hook as TransformerLens does; forward hooks' replacements are checked.

        The `LensHandle` keeps the callable given here as ``user_hook`` (what ``list_hooks()``
        shows), not the shape-checking wrapper that runs.
        """
        checked = hook if dir != "fwd" else _checked(hook)
        super().add_hook(checked, dir, is_permanent, level, prepend, alias_names)
        handles = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        handles[0 if prepend else -1].user_hook = hook

    def has_fwd_hooks(self) -> bool:
        """Whether any forward hook is attached or SAE spliced (cheap; used to skip lazy work)."""
        return len(self._forward_hooks) > 0 or bool(self.splices)

    def only_observers(self) -> bool:
        """Whether every attached forward hook is marked read-only (see `observer`) and no SAE is spliced."""
        return (
            not self.splices
            and all(is_observer(h.user_hook) for h in self.fwd_hooks if h.user_hook is not None)
            and len(self.fwd_hooks) == len(self._forward_hooks)
        )

    def iter_forward_hooks(self) -> Iterator[tuple[Callable[[Tensor], Tensor], bool]]:
        """Yield the attached forward hooks one at a time as ``(value -> new value, read_only)``.

        Lets a mixer apply hooks one by one and recompute what later hooks see in between (a
        state edit at position t changes every later state, and a caching hook registered after
        the editing hook should see the recomputed states). Spliced SAEs come first.
        """
        for splice in list(self.splices):
            yield splice, False
        user_hooks = {h.hook.id: h.user_hook for h in self.fwd_hooks}
        for handle_id, fn in list(self._forward_hooks.items()):

            def apply(value: Tensor, fn: Callable = fn) -> Tensor:
                out = fn(self, (value,), value)
                return value if out is None else out

            user_hook = user_hooks.get(handle_id)
            yield apply, user_hook is not None and is_observer(user_hook)


def _checked(hook: Callable) -> Callable:
    """Wrap a user hook so that a replacement of the wrong shape/dtype/device raises."""

    @functools.wraps(hook)
    def checked_hook(activation: Tensor, *, hook: _TLHookPoint) -> Tensor | None:
        result = user_hook(activation, hook=hook)
        if result is None or not isinstance(activation, Tensor):
            return result
        if not isinstance(result, Tensor):
            raise TypeError(
                f"The hook {_fn_name(user_hook)} on '{hook.name}' returned a {type(result).__name__}; "
                "return a tensor of the same shape and dtype, or None to keep the activation."
            )
        if result.shape != activation.shape or result.dtype != activation.dtype or (
            result.device != activation.device
        ):
            got = []
            if result.shape != activation.shape:
                got.append(f"shape {tuple(result.shape)}")
            if result.dtype != activation.dtype:
                got.append(f"dtype {result.dtype}")
            if result.device != activation.device:
                got.append(f"device {result.device}")
            named = getattr(hook, "shape", None)
            expected = f"[{named}] = " if named else ""
            raise ValueError(
                f"The hook {_fn_name(user_hook)} on '{hook.name}' returned {', '.join(got)}; this hook "
                f"point carries {expected}{tuple(activation.shape)} of dtype {activation.dtype}"
                + (f" on {activation.device}" if result.device != activation.device else "")
                + ". Return a tensor of the same shape and dtype, or None to keep the activation."
            )
        return result

    user_hook = hook
    # Keep the observer mark visible through the wrapper.
    if is_observer(hook):
        observer(checked_hook)
    return checked_hook


def _fn_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", repr(fn))


def changed_mask(before: Tensor, after: Tensor, n_trailing: int) -> Tensor | None:
    """Which leading positions differ between two tensors, or None if nothing changed.

    Args:
        before: The activation as computed.
        after: What the hooks left (same shape).
        n_trailing: How many trailing dimensions belong to one item (e.g. 2 for ``d_k d_v``).

    Returns:
        A bool tensor over the leading dimensions, or None when the tensors (and their
        forward-mode tangents, if any) are equal.
    """
    if after is before:
        return None
    tangents = fwAD.unpack_dual(before).tangent, fwAD.unpack_dual(after).tangent
    if tangents == (None, None):
        if torch.equal(after, before):
            return None
        diff = after != before
    else:
        # Under forward-mode AD an edit may change only the derivative (the edit of
        # `hooked_recurrent.linear_response` adds a zero value with a nonzero tangent): that is a
        # change too, or the recurrence would not carry the tangent to later positions.
        t_before, t_after = (torch.zeros_like(before) if t is None else t for t in tangents)
        diff = (after != before) | (t_after != t_before)
        if not diff.any():
            return None
    return diff.flatten(-n_trailing).any(-1) if n_trailing > 0 else diff


def edited_mask(snapshot: Tensor, original: Tensor, result: Tensor, n_trailing: int) -> Tensor | None:
    """Which items the hooks changed, for a result that must then replace the computed values.

    Besides changed values (`changed_mask`), a new tensor of equal values that carries its own
    gradient counts as changing every item under autograd: an SAE spliced with its error term
    returns the input's values computed through the SAE, and its gradient must reach the SAE.

    Args:
        snapshot: A copy of the activation taken before the hooks ran.
        original: The activation the hooks were given (they may have edited it in place).
        result: What the hooks left.
        n_trailing: Trailing dims of one item, see `changed_mask`.
    """
    changed = changed_mask(snapshot, result, n_trailing)
    if changed is None and result is not original and torch.is_grad_enabled() and result.requires_grad:
        return torch.ones(result.shape[: result.dim() - n_trailing], dtype=torch.bool, device=result.device)
    return changed


def fire(hook_point: HookPoint, value: Tensor, n_trailing: int) -> tuple[Tensor, Tensor | None]:
    """Run a hook point and report which items the hooks changed (in place or by replacement).

    Args:
        hook_point: The hook point.
        value: The activation.
        n_trailing: Trailing dims of one item, see `changed_mask`.

    Returns:
        ``(activation after hooks, bool mask of changed items or None)``.
    """
    if not hook_point.has_fwd_hooks():
        return value, None
    if hook_point.only_observers():
        hook_point(value)
        return value, None
    # Hooks may edit in place, so keep what was computed to compare against.
    reference = value.clone()
    result = hook_point(value)
    return result, edited_mask(reference, value, result, n_trailing)
