"""Feature dashboards for WriteSAE atoms: a self-contained HTML page, notebook views, a Neuronpedia export.

A WriteSAE atom ``A_i = v_i w_i^T`` has more to show than a residual-stream feature: where it fires
(top contexts, activation histogram), which queries retrieve it (key factor ``v_i``), what it writes
toward the vocabulary (value factor ``w_i`` through the head's output path and the unembedding),
how close it is to the native write (register or bundle), how long the gate keeps it (decay
horizon), what the paper's protocols measured for it, and the exact linear response of later
positions. ::

    data = build_dashboard(model, sae, tokens, out_dir="dashboards/L1H0")   # index.html, dashboard.json, neuronpedia/
    data                      # in a notebook: the atom list
    data.atom(12)             # in a notebook: atom 12's page

or ``writesae dashboard SAE --model M --tokens SOURCE --out DIR``.
"""

from .build import DashboardConfig, build_dashboard, write_dashboard
from .data import AtomRecord, Context, DashboardData, Histogram
from .neuronpedia import export_neuronpedia
from .page import render_page, write_page

__all__ = [
    "AtomRecord",
    "Context",
    "DashboardConfig",
    "DashboardData",
    "Histogram",
    "build_dashboard",
    "export_neuronpedia",
    "render_page",
    "write_dashboard",
    "write_page",
]
