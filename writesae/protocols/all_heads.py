"""The substitution test on every head of a layer, one SAE per head (paper Table 12, §3.7).

Each head's SAE runs the substitution test as it would alone (`SubstitutionSet`: one record log,
records tagged ``"H{head}"``); the summary lists each head's win rate and median KLs, their mean and
standard deviation over the heads that fired, each head's distance from that mean in standard
deviations, and how many heads exceed each threshold. The paper: mean 89.29% +- 2.63% over the 15
L9 heads of Qwen3.5-0.8B with firings (H12 had none), 14/15 above 85%, 12/15 above 88%.

The SAEs are given (one trained per head, e.g. by a `writesae sweep` grid over ``head``, or by
`train_head_saes`, which collects one store for all heads and trains each head's SAE with the
demo's recipe). The spread over heads is the population standard deviation (``ddof=0``), which is
what reproduces the paper's 2.63 from its Table 12 rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int
from torch import Tensor

from .cell import sae_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import ProtocolResult, run_protocol
from .substitution import SubstitutionConfig, SubstitutionTest
from .substitution_set import SubstitutionSet, TaggedRecord

__all__ = ["PAPER_REFERENCE", "AllHeadsConfig", "AllHeadsTest", "HeadRow", "run_all_heads", "train_head_saes"]

PAPER_REFERENCE: dict[str, str] = {
    "table": "Table 12",
    "model": "Qwen3.5-0.8B L9, 16 heads (H12 without firings)",
    "value": "mean 89.29% +- 2.63% over 15 heads (range 82.61-93.20%); 14/15 heads > 85%, 12/15 > 88%; H4 90.84%",
}


def _table12_substitution() -> SubstitutionConfig:
    return SubstitutionConfig(max_firings_per_atom=200)


@dataclass
class AllHeadsConfig:
    """Choices of the all-heads test (defaults: the paper's Table 12; docs/design.md §5).

    Attributes:
        substitution: The substitution test every head runs (paper: 200 firings per atom; its
            other fields keep the substitution test's main-text defaults).
        thresholds: Win rates a head is counted above (paper: 85% and 88%).
        sd_ddof: Degrees of freedom of the spread over heads: 0 (population sd) reproduces the
            paper's 2.63 from its rows; 1 gives the sample sd (2.72 there).
    """

    substitution: SubstitutionConfig = field(default_factory=_table12_substitution)
    thresholds: tuple[float, ...] = (0.85, 0.88)
    sd_ddof: int = 0

    def __post_init__(self) -> None:
        check_config(self, nonnegative=("thresholds",), nonempty=("thresholds",))
        if any(not 0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds are win rates in [0, 1] (got {self.thresholds})")
        if self.sd_ddof not in (0, 1):
            raise ValueError(f"sd_ddof must be 0 (population) or 1 (sample) (got {self.sd_ddof})")


@dataclass
class HeadRow:
    """One head (row of ``heads.jsonl``).

    Attributes:
        head: The head.
        n_records: Firings tested.
        win_rate: Headline win rate (None without firings).
        wilson95: Its Wilson interval.
        median_kl_atom: Median KL of the atom condition (headline variant).
        median_kl_delete: Median KL of the deletion.
        z: ``(win_rate - mean) / sd`` over the heads with firings.
        n_alive: Atoms that fire on the scanned sequences.
        n_registers: Registers among them.
    """

    head: int
    n_records: int
    win_rate: float | None
    wilson95: list[float] | None
    median_kl_atom: float | None
    median_kl_delete: float | None
    z: float | None
    n_alive: int
    n_registers: int


class AllHeadsTest(SubstitutionSet):
    """One substitution test per head of a layer (`run_all_heads`).

    Args:
        model: The hooked model.
        saes: One SAE per head, all of one layer and reading the same thing (states or writes).
        tokens: Held-out sequences.
        config: The test's choices.
        attention_mask: Padding mask of ``tokens``.
    """

    name, title = "all-heads", "Substitution test on every head of a layer (Table 12)"

    def __init__(
        self,
        model: Any,
        saes: list[Any] | dict[int, Any],
        tokens: Int[Tensor, "batch pos"],
        *,
        config: AllHeadsConfig | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> None:
        self.config = config = config or AllHeadsConfig()
        saes = list(saes.values()) if isinstance(saes, dict) else list(saes)
        if not saes:
            raise ValueError("all-heads needs one SAE per head; got none")
        cells = [sae_cell(model, sae) for sae in saes]
        layers, kinds = {c.layer for c, _ in cells}, {k for _, k in cells}
        heads = [c.head for c, _ in cells]
        if len(layers) > 1 or len(kinds) > 1:
            raise ValueError(f"all-heads compares the heads of one layer, SAEs reading one thing; got layers "
                             f"{sorted(layers)}, reading {sorted(kinds)}")  # fmt: skip
        if len(set(heads)) < len(heads):
            raise ValueError(f"one SAE per head: heads {sorted(heads)} repeat")
        self.layer, self.kind = layers.pop(), kinds.pop()
        order = sorted(range(len(saes)), key=lambda i: heads[i])
        tests = {f"H{heads[i]}": SubstitutionTest(model, saes[i], tokens, config=config.substitution,
                                                  attention_mask=attention_mask) for i in order}  # fmt: skip
        super().__init__(tests)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "thresholds": list(self.config.thresholds), "sd_ddof": self.config.sd_ddof}

    def summarize(self, records: list[TaggedRecord]) -> dict[str, Any]:
        summaries = self.summaries(records)
        rows = []
        for name, s in summaries.items():
            h = s.get("headline")
            rows.append({
                "head": int(name[1:]),
                "n_records": s["n_firings"],
                "win_rate": h["win_rate"] if h else None,
                "wilson95": [float(x) for x in h["wilson95"]] if h else None,
                "median_kl_atom": h["median_kl_atom"] if h else None,
                "median_kl_delete": h["median_kl_delete"] if h else None,
                "n_alive": s["partition"]["n_alive"],
                "n_registers": s["partition"]["n_registers"],
            })  # fmt: skip
        rates = np.array([r["win_rate"] for r in rows if r["win_rate"] is not None])
        mean = float(rates.mean()) if len(rates) else None
        sd = float(rates.std(ddof=self.config.sd_ddof)) if len(rates) > self.config.sd_ddof else None
        for r in rows:
            r["z"] = (r["win_rate"] - mean) / sd if r["win_rate"] is not None and sd else None
        headline: dict[str, Any] = {
            "layer": self.layer,
            "variant": self.config.substitution.headline,
            "n_heads": len(rows),
            "n_heads_with_firings": len(rates),
            "heads_without_firings": ",".join(f"H{r['head']}" for r in rows if r["win_rate"] is None),
            "mean_win_rate": mean,
            "sd_win_rate": sd,
            "min_win_rate": float(rates.min()) if len(rates) else None,
            "max_win_rate": float(rates.max()) if len(rates) else None,
            "n_records": sum(r["n_records"] for r in rows),
        }
        for t in self.config.thresholds:
            headline[f"n_heads_above_{t:g}"] = int((rates > t).sum())
        return {"headline": headline, "heads": rows, "paper_reference": PAPER_REFERENCE}

    def tables(self, summary: dict[str, Any], records: list[TaggedRecord]) -> dict[str, list[Any]]:
        return {"heads": [HeadRow(**row) for row in summary["heads"]]}

    def report(self, summary: dict[str, Any], records: list[TaggedRecord]) -> list[tuple[str, str]]:
        h = summary["headline"]
        extra = f"\n\nThresholds: {list(self.config.thresholds)}; sd with ddof={self.config.sd_ddof}"
        sections = [("Settings", config_table(self.config.substitution) + extra)]
        if h["mean_win_rate"] is None:
            return sections + [("Headline", f"No head of layer {h['layer']} has firings.")]
        above = "; ".join(f"{h[f'n_heads_above_{t:g}']}/{h['n_heads_with_firings']} heads above {t:.0%}"
                          for t in self.config.thresholds)  # fmt: skip
        sd = "n/a" if h["sd_win_rate"] is None else f"{h['sd_win_rate']:.2%}"
        sections.append((
            "Headline",
            f"Layer {h['layer']}, `{h['variant']}`: mean win rate **{h['mean_win_rate']:.2%} +- {sd}** over "
            f"{h['n_heads_with_firings']} of {h['n_heads']} heads with firings (range {h['min_win_rate']:.2%}-"
            f"{h['max_win_rate']:.2%}; {h['n_records']} firings); {above}. Paper ({PAPER_REFERENCE['table']}, "
            f"{PAPER_REFERENCE['model']}; a different model, cited as reference): {PAPER_REFERENCE['value']}.",
        ))  # fmt: skip
        rows = [{"head": f"H{r['head']}", "n_records": r["n_records"], "win rate": _pct(r["win_rate"]),
                 "median KL atom": r["median_kl_atom"], "median KL delete": r["median_kl_delete"],
                 "z": r["z"]} for r in summary["heads"]]  # fmt: skip
        sections.append(("Per head", markdown_table(rows, list(rows[0]))))
        return sections

    def plots(self, summary: dict[str, Any], records: list[TaggedRecord], plt: Any) -> dict[str, Any]:
        rows, h = summary["heads"], summary["headline"]
        fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(rows) + 2), 3.5))
        x = np.arange(len(rows))
        rates = np.array([np.nan if r["win_rate"] is None else r["win_rate"] for r in rows])
        bounds = [r["wilson95"] or (rate, rate) for r, rate in zip(rows, rates)]
        errors = [[rate - b[0] for rate, b in zip(rates, bounds)], [b[1] - rate for rate, b in zip(rates, bounds)]]
        ax.bar(x, rates, color="tab:blue", yerr=errors, capsize=2)
        if h["mean_win_rate"] is not None:
            ax.axhline(h["mean_win_rate"], color="black", linewidth=1, label=f"mean {h['mean_win_rate']:.1%}")
        for t in self.config.thresholds:
            ax.axhline(t, color="tab:red", linewidth=0.8, linestyle=":")
        ax.set_xticks(x, [f"H{r['head']}" for r in rows], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate (atom beats deletion)")
        ax.set_title(f"Layer {h['layer']}: every head (Wilson 95%; dotted: thresholds)")
        ax.legend(fontsize=8)
        return {"win_rate_by_head.png": fig}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def run_all_heads(
    model: Any,
    saes: list[Any] | dict[int, Any],
    tokens: Int[Tensor, "batch pos"],
    *,
    config: AllHeadsConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> ProtocolResult[TaggedRecord]:
    """Run the substitution test of one SAE per head of a layer; per-head win rates, mean +- sd.

    Args:
        model: The hooked model.
        saes: One SAE per head (a list, or head -> SAE), all of one layer.
        tokens: Held-out sequences.
        config: `AllHeadsConfig` (default: the paper's Table 12 setting).
        out_dir: The run directory; None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"``.
        verbose: Progress bar.
        attention_mask: Padding mask of ``tokens``.

    Returns:
        Records tagged ``"H{head}"`` (each head's equal those of `run_substitution` on its SAE); the
        summary's ``headline`` holds the mean, sd and counts above the thresholds, ``heads`` the rows.
    """
    return run_protocol(AllHeadsTest(model, saes, tokens, config=config, attention_mask=attention_mask), out_dir,
                        mode=mode, verbose=verbose)  # fmt: skip


def train_head_saes(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    out_dir: str | Path,
    *,
    heads: list[int] | None = None,
    kind: str = "state",
    d_sae: int = 512,
    k: int = 8,
    epochs: int = 20,
    seed: int = 0,
    mode: str = "new",
    device: str = "cpu",
) -> dict[int, Any]:
    """Collect one store of a layer's heads and train one WriteSAE per head with the demo's recipe.

    The recipe of `writesae.demo` (bilinear, rank 1, TopK, lr 2e-3, batch 128, data scaled to unit
    mean square); each SAE is saved under ``out_dir/H{head}``.

    Args:
        model: The hooked model.
        tokens: Training sequences (the training split).
        layer: The layer.
        out_dir: Where the store (``store/``), the trainings and the SAEs go.
        heads: Heads (default: all).
        kind: ``"state"`` (the paper's input) or ``"write"``.
        d_sae: Atoms per SAE.
        k: Active atoms per sample.
        epochs: Epochs.
        seed: Seed of the initialisation and draws.
        mode: ``"new"``, ``"resume"`` (continue the store and trainings) or ``"overwrite"``.
        device: Where the SAEs train.

    Returns:
        Head -> trained inference SAE.
    """
    from writesae.outputs import holds_files, prepare_output_dir
    from writesae.store import collect
    from writesae.trainer import TrainerConfig
    from writesae.training import train_on_store

    out = prepare_output_dir(out_dir, mode, what="per-head SAEs")
    heads = list(range(model.cfg.n_heads)) if heads is None else heads
    store_mode = "resume" if mode == "resume" and holds_files(out / "store") else "new"
    store = collect(model, tokens, layers=[layer], heads=heads, kind=kind, out_dir=out / "store", skip_first=1,
                    verbose=False, mode=store_mode)  # fmt: skip
    saes = {}
    for head in heads:
        training = out / f"training_H{head}"
        resume = training / "checkpoint" if (training / "checkpoint").is_dir() else None
        trainer = TrainerConfig(epochs=epochs, batch_size=128, lr=2e-3, warmup_steps=20, progress=False,
                                out_dir=prepare_output_dir(training, "resume" if resume else "overwrite"),
                                input_scaling="unit_mean_square")  # fmt: skip
        saes[head], _ = train_on_store(store, layer, head, d_sae=d_sae, k=k, trainer=trainer, seed=seed,
                                       resume_from=resume, device=device)  # fmt: skip
        saes[head].save_model(out / f"H{head}")
    return saes
