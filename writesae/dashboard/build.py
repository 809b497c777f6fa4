"""`build_dashboard`: scan a token source, read the factors, gather run figures, write the files.

Example (the shipped model, an untrained SAE on one head's writes; a trained one reads better)::

    >>> import writesae
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> from writesae import WriteSAE, WriteSAEConfig
    >>> from writesae.dashboard import DashboardConfig, build_dashboard
    >>> from writesae.tokens import token_blocks
    >>> model = HookedRecurrentModel.from_pretrained("stdlib:qwen3.5")
    >>> cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=16, k=2)
    >>> cfg.metadata.hook_name, cfg.metadata.hook_head_index = model.cfg.hook_name(1, "hook_write"), 0
    >>> sae = WriteSAE(cfg, seed=0)
    >>> tokens = token_blocks(model, "stdlib", n_sequences=4, seq_len=32)
    >>> data = build_dashboard(model, sae, tokens, config=DashboardConfig(linear_response=False), verbose=False)
    >>> 0 < len(data.atoms) <= 16
    True
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jaxtyping import Int
from torch import Tensor

from writesae.outputs import prepare_output_dir
from writesae.protocols.cell import sae_cell
from writesae.protocols.stats import partition_atoms

from .data import AtomRecord, Context, DashboardData, Histogram
from .readout import ValueReadout, value_readout
from .runs import atom_run_figures
from .scan import COSINE_EDGES, AtomScan, ScanConfig, scan_atoms
from .topk import RawContext

__all__ = ["DashboardConfig", "build_dashboard", "write_dashboard"]


@dataclass
class DashboardConfig(ScanConfig):
    """What the dashboard computes and keeps (the scan's settings, then these).

    Attributes:
        readout_tokens: Vocabulary entries shown at each end of a value factor's logit effect.
        register_threshold: Median cosine from which an atom is a register (the paper's tau = 0.05).
        linear_response: Compute the exact linear response of each atom's top firing.
        response_atoms: Compute it for this many atoms, the most frequent first (None: every alive
            atom). It costs one forward-mode pass of the model per atom, whatever the text's length.
        response_horizon: Later positions shown in the linear response.
        response_tokens: Tokens shown per later position (largest |change in logit| first).
    """

    readout_tokens: int = 10
    register_threshold: float = 0.05
    linear_response: bool = True
    response_atoms: int | None = None
    response_horizon: int = 8
    response_tokens: int = 3


def _strings(model: Any, ids: set[int]) -> dict[int, str]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:  # random-weight test models: show the ids
        return {i: f"⟨{i}⟩" for i in ids}
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def _context(raw: RawContext, strings: dict[int, str]) -> Context:
    return Context(raw.value, raw.sequence, raw.position, raw.center, [strings[t] for t in raw.tokens], raw.values)


def _merge(counts: Tensor, edges: Tensor, factor: int) -> Histogram:
    """Coarser bins for display: ``factor`` neighbouring bins summed."""
    merged = counts.reshape(-1, factor).sum(1)
    return Histogram(edges[::factor].tolist(), merged.tolist())


def _records(model: Any, scan: AtomScan, readout: ValueReadout, config: DashboardConfig) -> tuple[list[AtomRecord], float]:
    alive = scan.count.nonzero()[:, 0].tolist()
    contexts = {a: scan.contexts.contexts(a) for a in alive}
    queries = {a: scan.queries.contexts(a) for a in alive}
    ids = {t for a in alive for c in contexts[a] + queries[a] for t in c.tokens}
    ids |= set(readout.top_tokens[alive].flatten().tolist()) | set(readout.bottom_tokens[alive].flatten().tolist())
    strings = _strings(model, ids)

    cos_bins = scan.cosines.median_bins()
    cos_centers = (COSINE_EDGES[:-1] + COSINE_EDGES[1:]) / 2
    median_cos = {a: float(cos_centers[cos_bins[a]]) for a in alive}
    partition = partition_atoms(median_cos, threshold=config.register_threshold)
    registers = set(partition.registers)
    horizon_bins = scan.horizons.median_bins()

    records = []
    for a in alive:
        count = int(scan.count[a])
        sides = [
            {
                "top": [[strings[t], v] for t, v in zip(readout.top_tokens[a, r].tolist(), readout.top_values[a, r].tolist())],
                "bottom": [[strings[t], v] for t, v in zip(readout.bottom_tokens[a, r].tolist(), readout.bottom_values[a, r].tolist())],
            }
            for r in range(readout.top_tokens.shape[1])
        ]
        records.append(AtomRecord(
            index=a,
            count=count,
            frequency=count / max(scan.n_positions, 1),
            mean_activation=float(scan.total[a]) / count,
            max_activation=float(scan.peak[a]),
            activations=Histogram(scan.histograms.edges(a), scan.histograms.counts[a].tolist()),
            contexts=[_context(c, strings) for c in contexts[a]],
            queries=[_context(c, strings) for c in queries[a]],
            value_tokens=sides,
            logit_effects=Histogram(readout.histogram_edges[a].tolist(), readout.histogram_counts[a].tolist()),
            median_cosine=median_cos[a],
            cosine_class="register" if a in registers else "bundle",
            cosines=_merge(scan.cosines.counts[a], COSINE_EDGES, 5),
            horizon=int(horizon_bins[a]) + 1 if horizon_bins[a] >= 0 else None,
            horizons=Histogram(scan.horizons.edges.tolist(), scan.horizons.counts[a].tolist()),
        ))
    return records, partition.delta_bic


def build_dashboard(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "rows pos"],
    *,
    config: DashboardConfig | None = None,
    runs: list[str | os.PathLike] | tuple[str | os.PathLike, ...] = (),
    out_dir: str | os.PathLike | None = None,
    mode: str = "new",
    name: str | None = None,
    source: str = "tokens",
    verbose: bool = True,
) -> DashboardData:
    """Build the dashboard of every alive atom of a per-head WriteSAE.

    Args:
        model: The hooked model the SAE was trained on.
        sae: A per-head WriteSAE with factor atoms (``cfg.metadata`` names its hook and head).
        tokens: Token source, one row per sequence (e.g. `writesae.tokens.token_blocks`); scanned
            in batches, so any number of rows fits in memory.
        config: What to compute and keep.
        runs: Substitution / logit-shift run directories of this SAE, for their per-atom figures.
        out_dir: Where to write ``index.html``, ``dashboard.json`` and ``neuronpedia/`` (None: write nothing).
        mode: The output folder policy (`writesae.outputs.prepare_output_dir`): ``"new"`` refuses a
            folder that holds files, ``"overwrite"`` replaces them.
        name: The SAE's name in the page (default: its hook and head).
        source: What ``tokens`` are, for the page and the export (e.g. ``"stdlib"``).
        verbose: Progress bars.

    Returns:
        The data every view is rendered from.
    """
    config = config or DashboardConfig()
    if tokens.dim() != 2 or tokens.shape[1] <= config.skip_first:
        raise ValueError(
            f"tokens must be [rows, pos] with more than skip_first={config.skip_first} positions, got shape "
            f"{tuple(tokens.shape)}; pass token_blocks(model, source, n_sequences=..., seq_len=...)"
        )
    out = prepare_output_dir(out_dir, mode, what="dashboard") if out_dir is not None else None
    figures = atom_run_figures(runs)  # before the long scan: a wrong path fails at once
    start = time.time()
    cell, kind = sae_cell(model, sae)
    scan = scan_atoms(model, sae, tokens, config, verbose=verbose)
    readout = value_readout(model, sae, cell.layer, cell.head, n_tokens=config.readout_tokens)
    records, delta_bic = _records(model, scan, readout, config)
    for record in records:
        record.runs = figures.get(record.index, {})
    if config.linear_response:
        from .response import add_linear_responses

        chosen = sorted(records, key=lambda r: (-r.count, r.index))[: config.response_atoms]
        add_linear_responses(model, sae, tokens, chosen, config, verbose=verbose)
    meta = {
        "model": model.cfg.model_name,
        "sae": name or f"{sae.cfg.metadata.hook_name} head {cell.head}",
        "hook": sae.cfg.metadata.hook_name,
        "layer": cell.layer,
        "head": cell.head,
        "kind": kind,
        "d_sae": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "source": source,
        "n_sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "n_positions": scan.n_positions,
        "n_alive": len(records),
        "delta_bic": delta_bic,
        "runs": [str(r) for r in runs],
        "config": asdict(config),
        "seconds": round(time.time() - start, 2),
    }
    data = DashboardData(meta, records)
    if out is not None:
        write_dashboard(data, out)
    return data


def write_dashboard(data: DashboardData, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``dashboard.json``, the Neuronpedia export and, last, ``index.html`` into ``out_dir``.

    The page comes last, so a folder with an ``index.html`` holds a finished dashboard (what
    ``writesae dashboard --resume`` checks).
    """
    from .neuronpedia import export_neuronpedia
    from .page import write_page

    out = Path(out_dir)
    written = {"data": data.save(out / "dashboard.json"), "neuronpedia": export_neuronpedia(data, out / "neuronpedia")}
    written["html"] = write_page(data, out / "index.html")
    return written
