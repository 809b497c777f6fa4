"""Installs during generation (paper §5.3): write a target token's direction into the state.

For a target token T the head's value-space direction is ``v*_T = normalize(W_O[h]^T W_U[T])``: the
value a read should return for the head's output to push the logits toward T. The install adds
``m * ||W_t|| * k_t-hat v*_T^T`` to the head's write at 3 consecutive prompt positions (``W_t`` the
native write there, ``k_t-hat`` its unit key), then the model continues greedily. Measured against
the unedited continuation: whether T appears, T's rank and log-probability at the first generated
step, by class of T's initial rank.

Choices left open by the paper are `InstallConfig` fields: which key the installed write uses
(``"native"``: the write's own key, the suggested reading; ``"query"``: the query of the last
prompt position), the norm it is scaled to (the native write ``||k_t u_t^T||``; for Gated DeltaNet
the paper's ``||k_t v_t^T||`` omits ``beta_t``), the install positions (ends of the 3-position
window, counted back from the prompt's last token) and the target classes.
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

from hooked_recurrent.fork import on_rows

from .cell import Cell, trace_cell
from .edits import install_direction
from .report import RunDir, markdown_table, plt_module

__all__ = ["InstallConfig", "InstallResult", "run_install", "target_direction"]


@dataclass
class InstallConfig:
    """Choices of the install protocol.

    Attributes:
        multiples: Install magnitudes, in units of the native write's Frobenius norm (paper: 1.5, 3, 6).
        window: Consecutive install positions (paper: 3).
        ends_from_last: Where each install window ends, counted back from the last prompt token.
        new_tokens: Greedy tokens generated after the prompt (paper: 20).
        key: ``"native"`` (each position's own write key) or ``"query"`` (the last prompt query).
        rank_classes: Half-open ranges of the target's initial rank (1 = top-1), one class each.
        targets_per_class: Targets drawn per class and prompt.
        seed: Seed of the target draw.
    """

    multiples: tuple[float, ...] = (1.5, 3.0, 6.0)
    window: int = 3
    ends_from_last: tuple[int, ...] = (0, 1, 2, 4, 8)
    new_tokens: int = 20
    key: Literal["native", "query"] = "native"
    rank_classes: tuple[tuple[int, int], ...] = ((2, 10), (10, 100), (100, 1000), (1000, 10**9))
    targets_per_class: int = 2
    seed: int = 2026


@dataclass
class InstallResult:
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: InstallConfig = field(default_factory=InstallConfig)


def target_direction(model: Any, cell: Cell, token: int) -> Tensor:
    """``normalize(W_O[h]^T W_U[token])``: the read value that pushes the logits toward ``token``."""
    out_proj = model.mixer(cell.layer).head_output_weight(cell.head).detach().float()
    direction = out_proj.T @ model.W_U[:, token].detach().float()
    return torch.nn.functional.normalize(direction, dim=0).cpu()


def _rank(logits: Tensor, token: int) -> int:
    return int((logits > logits[token]).sum()) + 1


def _draw_targets(logits: Tensor, config: InstallConfig, generator: torch.Generator) -> list[tuple[int, str]]:
    order = logits.argsort(descending=True)
    targets = []
    for low, high in config.rank_classes:
        pool = order[low - 1 : min(high - 1, len(order))]
        if len(pool) == 0:
            continue
        picks = torch.randperm(len(pool), generator=generator)[: config.targets_per_class]
        targets += [(int(pool[p]), f"{low}-{high}") for p in picks]
    return targets


@torch.no_grad()
def run_install(
    model: Any,
    prompts: Int[Tensor, "batch pos"],
    layer: int,
    head: int,
    *,
    targets: list[int] | None = None,
    config: InstallConfig | None = None,
    out_dir: str | Path | None = None,
    verbose: bool = True,
) -> InstallResult:
    """Install target directions into a head's writes and generate.

    Args:
        model: The hooked model.
        prompts: Prompts without padding (one row each).
        layer: Matrix-recurrent layer of the head.
        head: Head index.
        targets: Target tokens for every prompt (default: drawn per prompt by initial-rank class).
        config: Protocol choices.
        out_dir: Where to write records, summary, report and plots.
        verbose: Progress bar.
    """
    config = config or InstallConfig()
    cell = Cell(layer, head)
    if not 0 <= head < model.cfg.n_heads or layer not in model.cfg.recurrent_layers:
        raise ValueError(f"no recurrent head {head} at layer {layer}; recurrent layers: {model.cfg.recurrent_layers}")
    length = prompts.shape[1]
    ends = [length - 1 - e for e in config.ends_from_last if length - 1 - e - (config.window - 1) >= 0]
    generator = torch.Generator().manual_seed(config.seed)
    trace = trace_cell(model, prompts, cell)
    records = []
    for b in tqdm(range(prompts.shape[0]), disable=not verbose, desc="installs"):
        prompt = prompts[b : b + 1]
        base_tokens = model.generate(prompt, config.new_tokens, do_sample=False, stop_at_eos=False, verbose=False)
        base_continuation = base_tokens[0, length:].tolist()
        base_logits = model(prompt)[0, -1].float().cpu()
        base_logp = torch.log_softmax(base_logits.double(), -1)
        chosen = [(t, "given") for t in targets] if targets is not None else _draw_targets(base_logits, config, generator)
        trials = [(t, cls, end, m) for t, cls in chosen for end in ends for m in config.multiples]
        if not trials:
            continue
        hooks = []
        for row, (token, _, end, multiple) in enumerate(trials):
            positions = list(range(end - config.window + 1, end + 1))
            if config.key == "native":
                keys = [trace.key[b, p] for p in positions]
            else:
                keys = [trace.query[b, length - 1]] * len(positions)
            magnitudes = [multiple * float(trace.key[b, p].norm() * trace.value[b, p].norm()) for p in positions]
            name, fn = install_direction(model, cell, positions, keys, target_direction(model, cell, token), magnitudes)
            hooks.append((name, on_rows(fn, row, row + 1)))
        batch = prompt.repeat(len(trials), 1)
        with model.hooks(fwd_hooks=hooks):
            first_logits = model(batch)[:, -1].float().cpu()
            generated = model.generate(batch, config.new_tokens, do_sample=False, stop_at_eos=False, verbose=False)
        first_logp = torch.log_softmax(first_logits.double(), -1)
        for row, (token, cls, end, multiple) in enumerate(trials):
            continuation = generated[row, length:].tolist()
            records.append({
                "prompt": b,
                "target": token,
                "target_class": cls,
                "install_end": end,
                "multiple": multiple,
                "in_continuation": token in continuation,
                "in_base_continuation": token in base_continuation,
                "rank_before": _rank(base_logits, token),
                "rank_after": _rank(first_logits[row], token),
                "logp_lift": float(first_logp[row, token] - base_logp[token]),
            })
    summary = summarize(records, config)
    summary["cell"] = {"layer": layer, "head": head}
    summary["config"] = asdict(config)
    result = InstallResult(records, summary, config)
    if out_dir is not None:
        write_run(result, out_dir)
    return result


def summarize(records: list[dict[str, Any]], config: InstallConfig) -> dict[str, Any]:
    """Target-in-continuation rates, rank shifts and first-step lifts by multiple and class."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["multiple"], r["target_class"]), []).append(r)
        groups.setdefault((r["multiple"], "pooled"), []).append(r)
    rows = []
    for (multiple, cls), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        rows.append({
            "multiple": multiple,
            "target_class": cls,
            "n": len(rs),
            "in_continuation": float(np.mean([r["in_continuation"] for r in rs])),
            "in_base_continuation": float(np.mean([r["in_base_continuation"] for r in rs])),
            "rank_improved": float(np.mean([r["rank_after"] < r["rank_before"] for r in rs])),
            "median_rank_shift": float(np.median([r["rank_before"] - r["rank_after"] for r in rs])),
            "median_logp_lift": float(np.median([r["logp_lift"] for r in rs])),
        })
    return {"n_trials": len(records), "groups": rows}


def write_run(result: InstallResult, out_dir: str | Path) -> RunDir:
    run = RunDir(out_dir)
    run.write_records(result.records)
    run.write_summary(result.summary)
    s = result.summary
    plots = []
    pooled = [g for g in s["groups"] if g["target_class"] == "pooled"]
    if pooled:
        plt = plt_module()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [g["multiple"] for g in pooled]
        ax.plot(xs, [g["in_continuation"] for g in pooled], marker="o", label="after install")
        ax.plot(xs, [g["in_base_continuation"] for g in pooled], marker="o", label="unedited")
        ax.set_xlabel("install magnitude (x native write norm)")
        ax.set_ylabel("target in continuation")
        ax.set_ylim(-0.02, 1.02)
        ax.legend()
        plots.append(run.save_figure(fig, "target_rate.png"))
    columns = ["multiple", "target_class", "n", "in_continuation", "in_base_continuation", "rank_improved",
               "median_rank_shift", "median_logp_lift"]
    sections = [
        ("Settings", markdown_table([{k: str(v) for k, v in s["config"].items()}], list(s["config"]))),
        ("Results", markdown_table(s["groups"], columns) if s["groups"] else "No trials."),
    ]
    run.write_report("Installs during generation", sections, plots)
    return run
