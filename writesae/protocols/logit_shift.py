"""The closed-form logit shift (paper §4): predicting what an atom written into the state does.

Add ``eps * v_i w_i^T`` (atom i: key factor ``v_i``, value factor ``w_i``) to a head's cached state
after position ``t0`` (a cache edit: position ``t0``'s own output is already computed, so the
perturbation reaches later positions only through the state) and read the logit of the top-1 token
at a later position ``t``. Dropping the
delta rule's cross terms, the perturbation decays by the gates and is read by the query::

    dlogit_tok(t) ~ eps * prod_{s=t0+1..t} alpha_s * <v_i, q_t> * <path(w_i), W_U[tok]>

``path`` is the head's output path: ``"out_proj"`` takes the head's columns of the layer's output
projection (the paper's Eq. 4 reading, ignoring norms and later layers); ``"jacobian"`` uses the
exact local derivative of the logit with respect to the head's read at ``t`` (autograd through the
gated norm, the projection, later layers and the final norm), which makes the prediction exact
to first order in eps for mixers without an erase term (Mamba-2) in a one-layer model.

Two variants are reported per (atom, eps) cell: the zero-parameter prediction, and a fitted gain
``G`` (one least-squares scalar per cell, the paper's "empirical G"); R^2 of each against the
measured shifts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.cache import RecurrentCache

from .cell import Cell, encode_trace, sae_cell, trace_cell
from .report import RunDir, markdown_table, plt_module

__all__ = ["LogitShiftConfig", "LogitShiftResult", "run_logit_shift", "r_squared"]


@dataclass
class LogitShiftConfig:
    """Choices of the logit-shift audit.

    Attributes:
        epsilons: Perturbation sizes (paper App. A: 0.1, 0.3, 1, 3; Table 9 lists 0.25..1).
        eps_scale: ``"absolute"`` (the paper's unit atoms) or ``"state_norm"``: each eps is multiplied
            by the median Frobenius norm of the cell's state on the prompts, so that the same grid is
            a small perturbation for models whose states are small.
        horizons: Offsets ``t - t0`` at which the shift is read.
        path: ``"out_proj"`` (paper) or ``"jacobian"`` (exact local derivative); see the module docstring.
        positions_per_prompt: Reference positions ``t0`` drawn per prompt.
        n_atoms: With no atoms given, the most frequently firing atoms on the prompts.
        seed: Seed of the position draw.
    """

    epsilons: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    eps_scale: Literal["absolute", "state_norm"] = "absolute"
    horizons: tuple[int, ...] = (1, 2, 4, 8)
    path: Literal["out_proj", "jacobian"] = "out_proj"
    positions_per_prompt: int = 1
    n_atoms: int = 8
    seed: int = 2026


@dataclass
class LogitShiftResult:
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: LogitShiftConfig = field(default_factory=LogitShiftConfig)


def r_squared(measured: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SS_res / SS_tot of a prediction taken as is."""
    ss_tot = float(((measured - measured.mean()) ** 2).sum())
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(((measured - predicted) ** 2).sum()) / ss_tot


def _fitted_gain(measured: np.ndarray, predicted: np.ndarray) -> float:
    denominator = float((predicted**2).sum())
    return float((measured * predicted).sum()) / denominator if denominator > 0 else float("nan")


def _read_gradient(model: Any, tokens: Tensor, mask: Tensor | None, cell: Cell, position: int, token: int) -> Tensor:
    """d logit_token(position) / d o_position of the cell's head: [d_v]."""
    name = cell.hook(model, "hook_recurrence_out")
    box: dict[str, Tensor] = {}

    def perturb(reads: Tensor, hook: Any) -> Tensor:
        delta = torch.zeros_like(reads, requires_grad=True)
        box["delta"] = delta
        return reads + delta

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[:, : position + 1], attention_mask=None if mask is None else mask[:, : position + 1], fwd_hooks=[(name, perturb)])
        grad = torch.autograd.grad(logits[0, position, token], box["delta"])[0]
    return grad[0, position, cell.head].detach().float().cpu()


@torch.no_grad()
def _cache_edit_logits(
    model: Any, tokens: Tensor, mask: Tensor | None, cell: Cell, t0: int, deltas: list[Tensor], horizon: int
) -> Tensor:
    """Logits at positions ``t0+1 .. t0+horizon`` after adding each delta to the cached state at ``t0``.

    Row 0 is unedited; row ``i`` has ``deltas[i-1]`` added to the head's state once position ``t0``
    has been read (a cache edit: the output at ``t0`` itself is unchanged).
    """
    cache = RecurrentCache(model, 1)
    model(tokens[:, : t0 + 1], attention_mask=None if mask is None else mask[:, : t0 + 1], cache=cache, return_type=None)
    tiled = cache.repeat(len(deltas) + 1)
    state = tiled.state(cell.layer)  # a view in the key-by-value layout
    for i, delta in enumerate(deltas):
        state[i + 1, cell.head] += delta.to(state)
    rest = tokens[:, t0 + 1 : t0 + 1 + horizon].repeat(len(deltas) + 1, 1)
    rest_mask = None if mask is None else mask[:, t0 + 1 : t0 + 1 + horizon].repeat(len(deltas) + 1, 1)
    return model(rest, attention_mask=rest_mask, cache=tiled).float().cpu()


def run_logit_shift(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    atoms: list[int] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    config: LogitShiftConfig | None = None,
    out_dir: str | Path | None = None,
    verbose: bool = True,
) -> LogitShiftResult:
    """Measure and predict the logit shifts of atoms written into the state.

    Args:
        model: The hooked model.
        sae: The per-head WriteSAE whose atoms are written (its cell is where they go).
        tokens: Prompts (one row each).
        atoms: Atoms to write (default: the ``n_atoms`` most frequent on the prompts).
        attention_mask: Padding mask of the prompts.
        config: Protocol choices.
        out_dir: Where to write records, summary, report and plots.
        verbose: Progress bar.
    """
    config = config or LogitShiftConfig()
    cell, kind = sae_cell(model, sae)
    with_states = kind == "state" or config.eps_scale == "state_norm"
    trace = trace_cell(model, tokens, cell, attention_mask=attention_mask, with_states=with_states)
    unit = 1.0
    if config.eps_scale == "state_norm":
        norms = trace.states.flatten(2).norm(dim=-1)
        unit = float(norms[attention_mask.bool().cpu()].median() if attention_mask is not None else norms.median())
    if atoms is None:
        counts = (encode_trace(sae, trace, kind) > 0).flatten(0, 1).sum(0)
        atoms = [int(a) for a in counts.argsort(descending=True)[: config.n_atoms] if counts[a] > 0]
    keys = sae.atom_key.detach().float().cpu()  # [d_sae, rank, d_k]
    values = sae.atom_value.detach().float().cpu()  # [d_sae, rank, d_v]
    out_proj = model.mixer(cell.layer).head_output_weight(cell.head).detach().float().cpu()  # [d_model, d_v]
    unembed = model.W_U.detach().float().cpu()  # [d_model, d_vocab]
    horizon = max(config.horizons)
    generator = torch.Generator().manual_seed(config.seed)
    lengths = tokens.shape[1] if attention_mask is None else attention_mask.sum(1)

    def mask_of(b: int) -> Tensor | None:
        return None if attention_mask is None else attention_mask[b : b + 1]

    records = []
    for b in tqdm(range(tokens.shape[0]), disable=not verbose, desc="logit shift"):
        start = 0 if attention_mask is None else int(tokens.shape[1] - lengths[b])
        end = tokens.shape[1] - horizon - 1
        if end <= start + 1:
            continue
        t0s = torch.randint(start + 1, end, (config.positions_per_prompt,), generator=generator).tolist()
        for t0 in t0s:
            deltas = [unit * eps * torch.einsum("rk,rv->kv", keys[a], values[a]) for a in atoms for eps in config.epsilons]
            logits = _cache_edit_logits(model, tokens[b : b + 1], mask_of(b), cell, t0, deltas, horizon)
            for h in config.horizons:
                t = t0 + h
                token = int(logits[0, h - 1].argmax())
                decay = float(trace.log_decay[b, t0 + 1 : t + 1].sum().exp())
                if config.path == "out_proj":
                    readout = out_proj.T @ unembed[:, token]  # [d_v]
                else:
                    readout = _read_gradient(model, tokens[b : b + 1], mask_of(b), cell, t, token)
                query = trace.query[b, t].float()
                for i, a in enumerate(atoms):
                    per_eps = unit * float(((keys[a] @ query) * (values[a] @ readout)).sum())  # sum over rank
                    for j, eps in enumerate(config.epsilons):
                        row = 1 + i * len(config.epsilons) + j
                        records.append({
                            "prompt": b,
                            "t0": t0,
                            "t": t,
                            "horizon": h,
                            "atom": a,
                            "eps": eps,
                            "token": token,
                            "gate_product": decay,
                            "predicted": eps * decay * per_eps,
                            "measured": float(logits[row, h - 1, token] - logits[0, h - 1, token]),
                        })
    summary = summarize(records, config)
    summary["cell"] = {"layer": cell.layer, "head": cell.head, "hook": sae.cfg.metadata.hook_name}
    summary["atoms"] = atoms
    summary["eps_unit"] = unit
    summary["config"] = asdict(config)
    result = LogitShiftResult(records, summary, config)
    if out_dir is not None:
        write_run(result, out_dir)
    return result


def summarize(records: list[dict[str, Any]], config: LogitShiftConfig) -> dict[str, Any]:
    """R^2 per (atom, eps) cell, zero-parameter and with a fitted gain."""
    cells: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["atom"], r["eps"]), []).append(r)
    rows = []
    for (atom, eps), rs in sorted(cells.items()):
        measured = np.array([r["measured"] for r in rs])
        predicted = np.array([r["predicted"] for r in rs])
        gain = _fitted_gain(measured, predicted)
        rows.append({
            "atom": atom,
            "eps": eps,
            "n": len(rs),
            "r2_zero_parameter": r_squared(measured, predicted),
            "fitted_gain": gain,
            "r2_fitted_gain": r_squared(measured, gain * predicted),
            "sign_agreement": float(np.mean(np.sign(measured) == np.sign(predicted))),
        })

    def median(key: str) -> float:
        values = [r[key] for r in rows if np.isfinite(r[key])]
        return float(np.median(values)) if values else float("nan")

    return {
        "n_records": len(records),
        "n_cells": len(rows),
        "median_r2_zero_parameter": median("r2_zero_parameter"),
        "median_r2_fitted_gain": median("r2_fitted_gain"),
        "median_sign_agreement": median("sign_agreement"),
        "cells": rows,
    }


def write_run(result: LogitShiftResult, out_dir: str | Path) -> RunDir:
    run = RunDir(out_dir)
    run.write_records(result.records)
    run.write_summary(result.summary)
    s = result.summary
    plots = []
    if result.records:
        plt = plt_module()
        fig, ax = plt.subplots(figsize=(4.5, 4))
        predicted = np.array([r["predicted"] for r in result.records])
        measured = np.array([r["measured"] for r in result.records])
        ax.scatter(predicted, measured, s=6, alpha=0.5)
        lim = float(max(np.abs(predicted).max(), np.abs(measured).max(), 1e-12))
        ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8)
        ax.set_xlabel("closed-form prediction (zero parameters)")
        ax.set_ylabel("measured logit shift")
        ax.set_title(f"median R^2 {s['median_r2_zero_parameter']:.3f} (fitted G: {s['median_r2_fitted_gain']:.3f})")
        plots.append(run.save_figure(fig, "r2_scatter.png"))
    columns = ["atom", "eps", "n", "r2_zero_parameter", "r2_fitted_gain", "fitted_gain", "sign_agreement"]
    sections = [
        ("Settings", markdown_table([{k: str(v) for k, v in s["config"].items()}], list(s["config"]))),
        (
            "Headline",
            f"{s['n_cells']} (atom, eps) cells, {s['n_records']} measurements: median R^2 "
            f"{s['median_r2_zero_parameter']:.3f} with no fitted parameter, {s['median_r2_fitted_gain']:.3f} with a "
            f"fitted gain per cell; sign agreement {s['median_sign_agreement']:.1%}.",
        ),
        ("Cells", markdown_table(s["cells"], columns)),
    ]
    run.write_report("Closed-form logit shift", sections, plots)
    return run
