"""The sweep grid file: which store, which settings vary, which stay fixed; its cells.

A grid is a YAML or JSON file (``.yaml``, ``.yml`` or ``.json``)::

    store: stores/stdlib-L0-2        # from `writesae collect`; holds every (layer, head) below
    grid:                            # every combination of these values is one cell
      layer: [0, 1]
      head: [0, 3]
      variant: [bilinear, flat]      # the SAE family: bilinear, flat, matrix, bilinear_tied, bilinear_flat
      d_sae: [256]
      k: [8, 16]
      seed: [0, 1]
      input_scaling: [unit_mean_square]
    fixed:                           # the same in every cell
      epochs: 5
      batch_size: 256
    substitution:                    # optional: each cell's substitution win rate (paper section 3)
      model: stdlib:qwen3.5          # default: the store's model
      sequences: 8
      seq_len: 64

Keys of ``grid`` and ``fixed``: ``layer`` and ``head`` (required, in one or the other), ``seed``
(the SAE's initialisation and the trainer's draws; default 42), any `WriteTrainingSAEConfig` field
in `SAE_KEYS` and any `TrainerConfig` field in `TRAINER_KEYS`. Settings left out take the
defaults of ``writesae train``. A relative ``store`` path is relative to the current directory,
like every path given to ``writesae``. Settings of one sparsity kind (`SPARSITY_KEYS`: JumpReLU's and the
gated SAE's) belong only to the cells of that kind: other cells leave them out, so a TopK cell is the
same cell whatever the grid says about gates.

A cell's identity (`SweepCell.digest`) is a hash of all its settings (defaults filled in) and of
the store's manifest; its folder (`SweepCell.id`) adds a readable name. The same cell in a later
run of a grown grid is recognised as finished, whatever the grid now calls it, and a changed
setting or store makes a new cell instead of reusing a stale one.

Example:
    >>> grid = SweepGrid.from_dict({"store": "s", "grid": {"head": [0, 1], "k": [4, 8]}, "fixed": {"layer": 2}})
    >>> [cell.name for cell in grid.cells()]
    ['L2_H0_k4', 'L2_H0_k8', 'L2_H1_k4', 'L2_H1_k8']
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["SweepGrid", "SweepCell", "SubstitutionSettings", "CELL_KEYS", "SAE_KEYS", "TRAINER_KEYS", "SPARSITY_KEYS",
           "load_grid"]

CELL_KEYS = ("layer", "head", "seed")
SAE_KEYS = ("d_sae", "k", "variant", "rank", "sparsity", "batchtopk_inference", "input_mean", "k_aux",
            "aux_loss_coefficient", "apply_b_dec_to_input", "jumprelu_init_threshold")  # fmt: skip
# TrainerConfig fields a cell may set (out_dir and progress belong to the sweep, seed to the cell).
TRAINER_KEYS = ("batch_size", "epochs", "max_samples", "lr", "lr_min", "warmup_steps", "adam_betas", "adam_eps",
                "grad_clip", "dead_steps", "resample_every", "resample_from", "resample_encoder_scale",
                "renorm_every", "val_every", "val_batch_size", "checkpoint_every", "log_every",
                "estimate_input_mean", "mean_samples", "input_scaling", "jumprelu_coefficient", "jumprelu_bandwidth",
                "jumprelu_bandwidth_final", "gated_coefficient", "gated_aux_coefficient", "gate",
                "gate_temperature")  # fmt: skip
# Settings that only cells of one sparsity kind have (module docstring).
SPARSITY_KEYS = {
    "jumprelu": ("jumprelu_init_threshold", "jumprelu_coefficient", "jumprelu_bandwidth", "jumprelu_bandwidth_final"),
    "gated": ("gated_coefficient", "gated_aux_coefficient", "gate", "gate_temperature"),
}
_ALL_KEYS = CELL_KEYS + SAE_KEYS + TRAINER_KEYS
# Settings every results table shows (after layer, head and the grid's keys).
_SHOWN = ("seed", "d_sae", "k", "variant", "input_scaling")
_SHORT = {"layer": "L", "head": "H", "d_sae": "d", "k": "k", "seed": "s", "rank": "r"}


def _defaults() -> dict[str, Any]:
    """What a setting left out of a grid is: `writesae train`'s defaults (its seed and d_sae), then
    the config classes' own."""
    from writesae.config import WriteTrainingSAEConfig
    from writesae.trainer import TrainerConfig

    values = {"seed": 42, "d_sae": 2048}
    for cls, keys in ((WriteTrainingSAEConfig, SAE_KEYS), (TrainerConfig, TRAINER_KEYS)):
        for f in fields(cls):
            if f.name in keys and f.name not in values:
                values[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return values


def _applicable(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the settings of sparsity kinds other than the cell's."""
    other = {k for sparsity, keys in SPARSITY_KEYS.items() if sparsity != settings.get("sparsity") for k in keys}
    return {k: v for k, v in settings.items() if k not in other}


def _bad(path: str, message: str) -> ValueError:
    return ValueError(f"sweep grid {path}: {message}")


@dataclass(frozen=True)
class SubstitutionSettings:
    """The optional substitution test run on each cell's SAE (held-out ``tokens``, split ``val``).

    Attributes:
        model: Model the store was collected from (default: the store's ``model.name``).
        tokens: Token source (see `writesae.tokens`).
        sequences: Held-out sequences.
        seq_len: Tokens per sequence.
        max_firings_per_atom: Firings kept per atom.
        n_bootstrap: Bootstrap resamples of the confidence intervals.
    """

    model: str | None = None
    tokens: str = "stdlib"
    sequences: int = 16
    seq_len: int = 64
    max_firings_per_atom: int = 8
    n_bootstrap: int = 200


@dataclass(frozen=True)
class SweepCell:
    """One cell: the full settings of one training run.

    Attributes:
        settings: ``layer``, ``head`` and every setting a sweep can make, those the grid leaves
            out at their defaults (so that writing a default out does not change the cell).
        varied: The grid keys, in grid order (they name the cell and make the table's columns).
        store_digest: Hash of the store's manifest (part of the identity).
    """

    settings: dict[str, Any]
    varied: tuple[str, ...]
    store_digest: str

    @property
    def layer(self) -> int:
        return self.settings["layer"]

    @property
    def head(self) -> int:
        return self.settings["head"]

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def name(self) -> str:
        parts = [f"L{self.layer}_H{self.head}"]
        for key in self.varied:
            if key not in ("layer", "head") and key in self.settings:
                value = self.settings[key]
                parts.append(f"{_SHORT[key]}{value}" if key in _SHORT else str(value))
        return "_".join(parts).replace("/", "-")

    @property
    def digest(self) -> str:
        """A hash of every setting and of the store: what makes two cells the same cell."""
        blob = json.dumps({"settings": self.settings, "store": self.store_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @property
    def id(self) -> str:
        """``name-digest``: the folder a new cell is trained in (a grown grid may name an old cell otherwise)."""
        return f"{self.name}-{self.digest}"

    def sae_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings.items() if k in SAE_KEYS}

    def trainer_kwargs(self) -> dict[str, Any]:
        values = {k: v for k, v in self.settings.items() if k in TRAINER_KEYS}
        if "adam_betas" in values:  # JSON and YAML have lists, TrainerConfig a tuple
            values["adam_betas"] = tuple(values["adam_betas"])
        return values

    def row(self) -> dict[str, Any]:
        """The cell's settings as the results table shows them: layer, head, the grid keys, then a few more."""
        shown = ["layer", "head", *[k for k in self.varied if k not in ("layer", "head")]]
        shown += [k for k in _SHOWN if k not in shown]
        return {"cell": self.id, **{k: self.settings.get(k) for k in shown}}


@dataclass(frozen=True)
class SweepGrid:
    """A parsed, validated grid (see the module docstring).

    Attributes:
        store: The store's directory.
        grid: Key -> the values it takes (in order).
        fixed: Key -> its value in every cell.
        substitution: Settings of the per-cell substitution test, or ``None``.
        source: Where the grid came from (for messages).
    """

    store: Path
    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    substitution: SubstitutionSettings | None = None
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SweepGrid:
        """Validate a grid given as plain data (what the file holds)."""
        if not isinstance(data, dict):
            raise _bad(source, f"the file must hold a mapping with 'store' and 'grid', not a {type(data).__name__}")
        unknown = sorted(set(data) - {"store", "grid", "fixed", "substitution"})
        if unknown:
            raise _bad(source, f"unknown top-level keys {unknown}; allowed: store, grid, fixed, substitution")
        if "store" not in data or "grid" not in data:
            raise _bad(source, "needs 'store' (a store directory from `writesae collect`) and 'grid' (key: [values, ...])")
        grid, fixed = data["grid"], data.get("fixed") or {}
        if not isinstance(grid, dict) or not grid or not isinstance(fixed, dict):
            raise _bad(source, "'grid' must map keys to lists of values (at least one key), 'fixed' keys to values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise _bad(source, f"grid key {key!r} must list at least one value, e.g. {key}: [{values!r}]")
            if len(set(map(json.dumps, values))) != len(values):
                raise _bad(source, f"grid key {key!r} repeats a value ({values}); each cell would run twice")
        for key in [*grid, *fixed]:
            if key not in _ALL_KEYS:
                raise _bad(source, f"unknown setting {key!r}; a sweep can set {', '.join(_ALL_KEYS)}")
        both = sorted(set(grid) & set(fixed))
        if both:
            raise _bad(source, f"{both} are both in 'grid' and in 'fixed'; keep each in one place")
        for key in ("layer", "head"):
            if key not in grid and key not in fixed:
                raise _bad(source, f"'{key}' is missing: put it in 'grid' (several) or 'fixed' (one)")
        substitution = data.get("substitution")
        if substitution is not None:
            allowed = {f.name for f in fields(SubstitutionSettings)}
            if not isinstance(substitution, dict) or set(substitution) - allowed:
                raise _bad(source, f"'substitution' takes {sorted(allowed)} (got {substitution!r})")
            substitution = SubstitutionSettings(**substitution)
        return cls(Path(data["store"]), dict(grid), dict(fixed), substitution, source)

    def cells(self, store_digest: str = "") -> list[SweepCell]:
        """Every combination of the grid's values, in grid order (the last key varies fastest); combinations
        that differ only in settings their sparsity does not have are one cell."""
        keys, defaults = list(self.grid), _defaults()
        cells = [
            SweepCell(_applicable({**defaults, **self.fixed, **dict(zip(keys, combo))}), tuple(keys), store_digest)
            for combo in itertools.product(*(self.grid[k] for k in keys))
        ]
        first = {}
        for cell in cells:
            first.setdefault(cell.digest, cell)
        return list(first.values())


def _loader() -> type:
    """PyYAML's safe loader, reading ``3e-4`` as a number (YAML 1.1 reads it as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    return Loader


def load_grid(path: str | os.PathLike) -> SweepGrid:
    """Read and validate a grid file (``.yaml``/``.yml`` or ``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep grid {path} not found; write one as in `writesae sweep --help`")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_loader())
        except yaml.YAMLError as err:
            raise _bad(str(path), f"not valid YAML: {err}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise _bad(str(path), f"not valid JSON: {err}") from None
    else:
        raise _bad(str(path), f"unknown file type {path.suffix!r}; name it .yaml, .yml or .json")
    return SweepGrid.from_dict(data, str(path))
