"""The dashboard as one self-contained HTML file: opens from disk, offline, with nothing to fetch.

The file holds the stylesheet, a small script and the pre-rendered fragments of `views`: the atom
list, and the atoms' pages in chunks of ``CHUNK`` atoms, each gzip-compressed and base64-encoded
(chunks compress far better than single pages, which share little). The script inflates a chunk only
when one of its atoms is shown, so the file stays small (about 2 kB per alive atom) and opens at once
whatever the number of atoms. Navigation is by URL fragment: ``index.html#atom-12`` opens atom 12.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from html import escape
from importlib import resources
from pathlib import Path

from hooked_recurrent.files import atomic_write_text

from .data import DashboardData
from .views import atom_list, atom_page, stylesheet, summary

__all__ = ["render_page", "write_page", "CHUNK"]

CHUNK = 16  # atom pages per compressed chunk


def _pack(fragment: str) -> str:
    # mtime=0: the same data gives the same bytes (reproducible files).
    return base64.b64encode(gzip.compress(fragment.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def render_page(data: DashboardData) -> str:
    """The whole dashboard as an HTML string."""
    records = sorted(data.atoms, key=lambda r: r.index)
    chunks = [records[i : i + CHUNK] for i in range(0, len(records), CHUNK)]
    payload = {
        "list": _pack(atom_list(data)),
        "chunks": [_pack(json.dumps({str(r.index): atom_page(r) for r in chunk})) for chunk in chunks],
        "atoms": {str(r.index): i for i, chunk in enumerate(chunks) for r in chunk},  # atom -> its chunk
    }
    script = resources.files(__package__).joinpath("assets/dashboard.js").read_text(encoding="utf-8")
    title = f"WriteSAE dashboard: {data.meta['sae']}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{stylesheet()}</style></head>"
        '<body class="wsd"><header class="wsd-header">'
        f"<h1>{escape(title)}</h1>{summary(data.meta)}"
        '<nav><a href="#">all atoms</a><form id="wsd-jump">open atom <input name="atom" size="6" '
        'inputmode="numeric" aria-label="atom index"></form>'
        '<span class="wsd-note">click a column to sort, a row to open its atom</span></nav></header>'
        '<main><div id="wsd-list"></div><div id="wsd-atom" hidden></div></main>'
        # Base64 and digit keys hold no "<", so the JSON cannot close its script element.
        f'<script type="application/json" id="wsd-data">{json.dumps(payload, separators=(",", ":"))}</script>'
        f"<script>{script}</script></body></html>\n"
    )


def write_page(data: DashboardData, path: str | os.PathLike) -> Path:
    """Write the page atomically; ``path`` is the file or its folder (then ``index.html``)."""
    path = Path(path)
    if path.suffix not in (".html", ".htm"):
        path = path / "index.html"
    return atomic_write_text(path, render_page(data))
