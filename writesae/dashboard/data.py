"""The dashboard's data: one JSON-able record per alive atom, and the settings that produced them.

`DashboardData` is what `build_dashboard` returns and what every view reads: the HTML page, the
notebook displays and the Neuronpedia export are all rendered from it, and it saves to (and loads
from) ``dashboard.json``. In a notebook, a `DashboardData` displays as the atom list, and
``data.atom(i)`` as atom ``i``'s page.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hooked_recurrent.files import atomic_write_text
from writesae.outputs import jsonable

__all__ = ["Context", "Histogram", "AtomRecord", "DashboardData"]


@dataclass
class Context:
    """A window of text around one position, with a score at every token.

    Attributes:
        value: The score at the position (an activation, or a retrieval score).
        sequence: Row of the token source.
        position: Position in the row.
        center: Index of the position in ``tokens``.
        tokens: The window's tokens as strings.
        values: The score at each token of the window.
    """

    value: float
    sequence: int
    position: int
    center: int
    tokens: list[str]
    values: list[float]


@dataclass
class Histogram:
    """Counts over bins: ``counts[j]`` values fell in ``[edges[j], edges[j + 1])``."""

    edges: list[float]
    counts: list[int]


@dataclass
class AtomRecord:
    """Everything the dashboard shows about one atom.

    Attributes:
        index: The atom's index in the SAE.
        count: Firings (positions with a nonzero code) over the token source.
        frequency: ``count`` over the positions scanned.
        mean_activation: Mean code over the firings.
        max_activation: Largest code.
        activations: Histogram of the code over the firings.
        contexts: Top firing contexts, with the atom's code at each token.
        queries: Top retrieving positions (key factor): ``|A^T q_t|`` at each token.
        value_tokens: Per value factor, the tokens whose logits a retrieval raises (``top``) and
            lowers (``bottom``), as ``[token, logit effect]`` pairs (see `writesae.dashboard.readout`).
        logit_effects: Histogram of the (first) value factor's logit effect over the vocabulary.
        median_cosine: Median Frobenius cosine of the atom to the native write at its firings.
        cosine_class: ``"register"`` if ``median_cosine >= register_threshold``, else ``"bundle"``.
        cosines: Histogram of those cosines.
        horizon: Median gate half-life after the firings, in tokens (None if none was observed;
            ``max_horizon + 1`` means longer than ``max_horizon``).
        horizons: Histogram of the half-lives (bin ``j`` holds ``j + 1`` tokens).
        runs: Per-atom figures from protocol run directories (substitution, logit shift).
        response: The exact linear response of later positions to the atom's top firing.
    """

    index: int
    count: int
    frequency: float
    mean_activation: float
    max_activation: float
    activations: Histogram
    contexts: list[Context]
    queries: list[Context]
    value_tokens: list[dict[str, list[list[Any]]]]
    logit_effects: Histogram
    median_cosine: float | None
    cosine_class: str | None
    cosines: Histogram
    horizon: int | None
    horizons: Histogram
    runs: dict[str, Any] = field(default_factory=dict)
    response: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AtomRecord:
        d = dict(d)
        for name in ("activations", "logit_effects", "cosines", "horizons"):
            d[name] = Histogram(**d[name])
        d["contexts"] = [Context(**c) for c in d["contexts"]]
        d["queries"] = [Context(**c) for c in d["queries"]]
        return cls(**d)

    def _repr_html_(self) -> str:
        from .views import notebook_html, atom_page

        return notebook_html(atom_page(self))


@dataclass
class DashboardData:
    """Per-atom records of alive atoms plus ``meta`` (model, SAE, token source, settings, totals)."""

    meta: dict[str, Any]
    atoms: list[AtomRecord]

    def atom(self, index: int) -> AtomRecord:
        """The record of atom ``index`` (which must be alive: it fired on the token source)."""
        for record in self.atoms:
            if record.index == index:
                return record
        alive = sorted(r.index for r in self.atoms)
        shown = ", ".join(map(str, alive[:20])) + (", ..." if len(alive) > 20 else "")
        raise KeyError(
            f"atom {index} did not fire on the token source, so it has no page; alive atoms: {shown}"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``dashboard.json`` (atomically); ``path`` is the file or its folder."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "dashboard.json"
        data = {"meta": self.meta, "atoms": [asdict(a) for a in self.atoms]}
        return atomic_write_text(path, json.dumps(jsonable(data)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DashboardData:
        """Read a saved ``dashboard.json`` (the file or its folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "dashboard.json"
        if not path.exists():
            raise FileNotFoundError(f"no dashboard data at {path}: build one with writesae.dashboard.build_dashboard")
        raw = json.loads(path.read_text())
        return cls(raw["meta"], [AtomRecord.from_dict(a) for a in raw["atoms"]])

    def _repr_html_(self) -> str:
        from .views import atom_list, notebook_html

        return notebook_html(atom_list(self, limit=50))
