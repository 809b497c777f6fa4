"""Checks of a protocol config at construction: a bad value is refused with its name, value and range.

A config dataclass calls `check_config` from its ``__post_init__``; the command line validates the
same options with argparse types, but a config built in Python must not run a silent no-op either
(``LogitShiftConfig(n_atoms=0)`` would measure nothing and report an empty summary).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Iterable
from dataclasses import fields
from typing import Any, Literal

__all__ = ["check_config"]


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation (``Literal[...] | None`` included), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        choices = [c for arg in typing.get_args(annotation) for c in (_literal_choices(arg) or ())]
        if choices and type(None) in typing.get_args(annotation):
            return (*choices, None)
        return tuple(choices) or None
    return None


def _element_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed elements of a ``tuple[Literal[...], ...]`` annotation, else None."""
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return _literal_choices(args[0])
    return None


def _numbers(value: Any) -> Iterable[Any]:
    return value if isinstance(value, (tuple, list)) else (value,)


def check_config(
    config: Any,
    *,
    positive: Iterable[str] = (),
    nonnegative: Iterable[str] = (),
    nonempty: Iterable[str] = (),
) -> None:
    """Refuse a config whose fields are out of range.

    Every ``Literal`` field must hold one of its choices (each element, for ``tuple[Literal[...], ...]``). The fields named in ``positive`` /
    ``nonnegative`` (numbers, or tuples of numbers; None is allowed where the field's default says
    "all") must be finite and > 0 / >= 0, and those in ``nonempty`` (tuples) must hold something.

    Raises:
        ValueError: Naming the config, the field, the value and what is valid.
    """
    name = type(config).__name__
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        choices = _literal_choices(hints.get(f.name))
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{name}.{f.name}={value!r} is not one of {', '.join(map(repr, choices))}")
        elements = _element_choices(hints.get(f.name))
        bad = [v for v in value if v not in elements] if elements is not None and isinstance(value, tuple) else []
        if bad:
            raise ValueError(f"{name}.{f.name} holds {bad[0]!r}, which is not one of {', '.join(map(repr, elements))}")
    for field_name in nonempty:
        if len(getattr(config, field_name)) == 0:
            raise ValueError(f"{name}.{field_name} is empty: give at least one value")
    for fields_, ok, what in ((positive, lambda v: v > 0, "> 0"), (nonnegative, lambda v: v >= 0, ">= 0")):
        for field_name in fields_:
            value = getattr(config, field_name)
            if value is None:
                continue
            for v in _numbers(value):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                    raise ValueError(f"{name}.{field_name}={value!r}: every value must be a finite number {what}")
