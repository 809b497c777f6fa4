"""The single-position sign test (paper §5.2): does the closed form predict which way a written token moves?

For a target token ``T`` the value direction is ``v*_T = normalize(W_O[h]^T W_U[T])``
(`writesae.protocols.install.target_direction`). It is written into the head's memory at one
position ``t`` as ``Delta = m * n_t * k^ v*_T^T`` (added to the write at ``t``; ``k^`` a unit key,
``n_t`` the native write's norm), and ``T``'s logit is read at ``t' = t + h``. The paper's closed
form (§4, Eq. 4) predicts the change::

    dlogit_T(t') ~ G * m * n_t * (q_t' . k^) * ||W_O[h]^T W_U[T]||,    G = prod_{s=t+1..t'} alpha_s

so its sign is the sign of ``q_t' . k^``. The paper reports sign agreement 84.6% over 2,000
(prompt, position, token) triples at Qwen3.5-0.8B L9 H4 (95% CI [83.0, 86.2]), Pearson r = 0.162,
median measured / predicted ratio 1.08 and a pooled R^2 of -0.06. Every record also carries the
exact first-order change (`hooked_recurrent.linear_response`, forward-mode AD through the whole
model), so the formula's misses can be told apart from the edit leaving first order.

The paper does not say which key writes ``v*_T``, how large the write is, or which tokens are
targets; each is a `SignTestConfig` field (docs/design.md §5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from scipy import stats as sps
from torch import Tensor

from hooked_recurrent.edits import add_to_writes
from hooked_recurrent.linear_response import LOGITS, linear_responses

from .cell import recurrent_cell, trace_cell
from .checks import check_config
from .install import target_direction
from .logit_shift import r_squared
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, unit_generator
from .stats import wilson_interval
from .walk import SequenceWalk

__all__ = ["PAPER_REFERENCE", "PREDICTIONS", "SignTest", "SignTestConfig", "SignTestRecord", "run_sign_test"]

PAPER_REFERENCE: dict[str, str] = {
    "table": "§5.2 (text)",
    "model": "Qwen3.5-0.8B L9 H4, 2,000 (prompt, position, token) triples",
    "value": "sign agreement 84.6% (95% CI [83.0, 86.2]); Pearson r 0.162; median measured/predicted 1.08; "
    "pooled R^2 -0.06",
}
"""The paper's figures (paper-spec §5.2), for reports that put them beside a run's."""

PREDICTIONS: dict[str, str] = {
    "out_proj": "the paper's closed form: gate product, (q_t' . k^), ||W_O[h]^T W_U[T]||",
    "exact": "the exact first-order change (forward-mode AD through the model)",
}
"""The predictions every record carries."""


@dataclass
class SignTestConfig:
    """Choices of the sign test (docs/design.md §5; the paper leaves them open).

    Attributes:
        key: ``"native"``: the write's own unit key at ``t`` (paper-spec's suggested reading, so the
            sign is ``q_t' . k_t``); ``"random"``: a uniform random unit key.
        multiple: ``m``: the write's norm in units of the native write's norm at ``t``.
        norm: ``"unscaled"``: the native norm without the write's strength (``||k_t v_t^T||``, as the
            installs of §5.3); ``"native"``: ``||k_t u_t^T||``.
        horizon: ``t' - t``: the position that reads the write (0: the edited position itself).
        target_ranks: ``[low, high)``: targets drawn among the tokens of this initial rank at ``t'``
            (1 = top; default: the installs' mid-rank class, 100-1000).
        targets_per_position: Targets per (prompt, position).
        positions_per_prompt: Positions ``t`` drawn per prompt.
        seed: Seed of the draws.
    """

    key: Literal["native", "random"] = "native"
    multiple: float = 1.0
    norm: Literal["unscaled", "native"] = "unscaled"
    horizon: int = 1
    target_ranks: tuple[int, int] = (100, 1000)
    targets_per_position: int = 1
    positions_per_prompt: int = 4
    seed: int = 2026

    def __post_init__(self) -> None:
        check_config(self, positive=("multiple", "target_ranks", "targets_per_position", "positions_per_prompt"),
                     nonnegative=("horizon",))  # fmt: skip
        if self.target_ranks[0] >= self.target_ranks[1]:
            raise ValueError(
                f"SignTestConfig.target_ranks={self.target_ranks} is empty: give (low, high) with low < high"
            )


@dataclass
class SignTestRecord:
    """One (prompt, position, token) triple.

    Attributes:
        prompt: Prompt index.
        position: ``t``, where ``v*_T`` is written.
        reader: ``t'``, where ``T``'s logit is read.
        target: ``T``.
        target_rank: ``T``'s rank at ``t'`` unedited (1 = top).
        key_query_cosine: Cosine of the write's key to the query at ``t'``.
        gate_product: ``prod_{s=t+1..t'} alpha_s``.
        write_norm: Frobenius norm of the added matrix.
        measured: ``T``'s logit change at ``t'``.
        predicted: Each of `PREDICTIONS`.
    """

    prompt: int
    position: int
    reader: int
    target: int
    target_rank: int
    key_query_cosine: float
    gate_product: float
    write_norm: float
    measured: float
    predicted: dict[str, float]


class SignTest(Protocol[SignTestRecord]):
    """The single-position sign test (run it with `run_protocol`, or `run_sign_test`).

    Args:
        model: The hooked model.
        tokens: Prompts (one row each, no padding).
        layer: Matrix-recurrent layer of the head.
        head: Head index.
        targets: Target tokens at every position (default: drawn by ``config.target_ranks``).
        config: Protocol choices.
    """

    name, title, record_type = "sign-test", "Single-position sign test", SignTestRecord

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "batch pos"],
        layer: int,
        head: int,
        *,
        targets: list[int] | None = None,
        config: SignTestConfig | None = None,
    ) -> None:
        cell = recurrent_cell(model, layer, head)
        self.config = config = config or SignTestConfig()
        if tokens.shape[1] < config.horizon + 2:
            raise ValueError(
                f"prompts of {tokens.shape[1]} tokens leave no position to write at a horizon of {config.horizon}"
            )
        self.model, self.tokens, self.cell, self.targets = model, tokens, cell, targets
        with torch.no_grad():
            out_proj = model.mixer(layer).head_output_weight(head).detach().float().cpu()
            self.readout = (out_proj.T @ model.W_U.detach().float().cpu()).norm(dim=0)  # ||W_O^T W_U[T]|| per token

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head},
            "targets": self.targets,
            "tokens": {
                "shape": list(self.tokens.shape),
                "sha1": hashlib.sha1(self.tokens.cpu().numpy().tobytes()).hexdigest(),
            },
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[SignTestRecord]]]]:
        for b in range(self.tokens.shape[0]):
            yield f"prompt-{b}", lambda b=b: self._prompt(b)

    def _prompt(self, b: int) -> list[SignTestRecord]:
        config, cell, model = self.config, self.cell, self.model
        prompt = self.tokens[b : b + 1]
        generator = unit_generator(config.seed, f"prompt-{b}")
        last = prompt.shape[1] - 1 - config.horizon  # the latest position whose reader is in the prompt
        n = min(config.positions_per_prompt, last + 1)
        positions = sorted(torch.randperm(last + 1, generator=generator)[:n].tolist())
        trace = trace_cell(model, prompt, cell, with_logits=True)
        walk = SequenceWalk(model, prompt)
        hook = cell.write_hook(model)
        records = []
        for t in positions:
            reader = t + config.horizon
            base = trace.logits[0, reader].float()
            targets = self.targets if self.targets is not None else self._draw(base, generator)
            key = trace.key[0, t].float() if config.key == "native" else torch.randn(model.cfg.d_k, generator=generator)
            key = torch.nn.functional.normalize(key, dim=0)
            norm = float(trace.key[0, t].norm() * trace.value[0, t].norm())
            if config.norm == "unscaled":
                norm /= max(float(trace.strength[0, t]), 1e-30)
            deltas = torch.stack(
                [config.multiple * norm * torch.outer(key, target_direction(model, cell, T)) for T in targets]
            )
            with torch.no_grad():
                conditions = [(0, [])] + [(0, [(hook, add_to_writes({t: d}))]) for d in deltas]
                logits = walk.fork_rows(t, conditions, until=reader + 1)[:, -1].double().cpu()
            exact = linear_responses(model, prompt[:, t : reader + 1], hook, t, deltas, cache=walk.cache_at(t))
            exact = exact[LOGITS][:, 0, -1].double().cpu()  # [targets, d_vocab]
            query = trace.query[0, reader].float()
            gate = float(trace.log_decay[0, t + 1 : reader + 1].sum().exp())
            for i, T in enumerate(targets):
                size = float(deltas[i].norm())
                records.append(SignTestRecord(
                    prompt=b, position=t, reader=reader, target=T, target_rank=int((base > base[T]).sum()) + 1,
                    key_query_cosine=float(key @ query / query.norm().clamp(min=1e-30)), gate_product=gate,
                    write_norm=size, measured=float(logits[i + 1, T] - logits[0, T]),
                    predicted={"out_proj": gate * size * float(key @ query) * float(self.readout[T]),
                               "exact": float(exact[i, T])},
                ))  # fmt: skip
        return records

    def _draw(self, logits: Tensor, generator: torch.Generator) -> list[int]:
        low, high = self.config.target_ranks
        pool = logits.argsort(descending=True)[low - 1 : min(high - 1, len(logits))]
        if len(pool) == 0:
            return []
        picks = torch.randperm(len(pool), generator=generator)[: self.config.targets_per_position]
        return [int(pool[p]) for p in picks]

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[SignTestRecord]) -> dict[str, Any]:
        summary: dict[str, Any] = {"n": len(records)}
        if not records:
            return summary
        measured = np.array([r.measured for r in records])
        rows = []
        for name in PREDICTIONS:
            predicted = np.array([r.predicted[name] for r in records])
            agree = int((np.sign(predicted) == np.sign(measured)).sum())
            ratio = measured / np.where(predicted == 0, np.nan, predicted)
            rows.append({
                "prediction": name,
                "sign_agreement": agree / len(records),
                "wilson95": wilson_interval(agree, len(records)),
                "pearson_r": _pearson(predicted, measured),
                "median_ratio": float(np.nanmedian(ratio)),
                "r2": r_squared(measured, predicted),
            })  # fmt: skip
        summary["predictions"] = rows
        summary["median_abs_logit_change"] = float(np.median(np.abs(measured)))
        summary["positive_fraction"] = float((measured > 0).mean())
        paper = rows[0]
        summary["headline"] = {
            "n": len(records),
            "sign_agreement": paper["sign_agreement"],
            "sign_agreement_wilson95": paper["wilson95"],
            "pearson_r": paper["pearson_r"],
            "median_measured_over_predicted": paper["median_ratio"],
            "r2": paper["r2"],
            "exact_first_order_sign_agreement": rows[1]["sign_agreement"],
            "median_target_logit_change": float(np.median(measured)),
        }
        return summary

    def report(self, summary: dict[str, Any], records: list[SignTestRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Headline", "No triples (no target in the rank class).")]
        h = summary["headline"]
        r = "n/a" if h["pearson_r"] is None else f"{h['pearson_r']:.3f}"
        sections.append((
            "Headline",
            (f"Writing v*_T at one position (key `{self.config.key}`, {self.config.multiple:g} x the native norm), the "
             f"closed form predicts the sign of T's logit change {self.config.horizon} position(s) later on "
             f"**{h['sign_agreement']:.1%}** of {h['n']} triples (Wilson 95% [{h['sign_agreement_wilson95'][0]:.1%}, "
             f"{h['sign_agreement_wilson95'][1]:.1%}]); Pearson r {r}, median measured / predicted "
             f"{h['median_measured_over_predicted']:.3g}, R^2 {h['r2']:.3g}. The exact first-order change has the "
             "right "
             f"sign on {h['exact_first_order_sign_agreement']:.1%}. "
             f"Paper ({PAPER_REFERENCE['model']}, a different model): {PAPER_REFERENCE['value']}."),
        ))  # fmt: skip
        columns = ["prediction", "sign_agreement", "pearson_r", "median_ratio", "r2"]
        sections.append(("Both predictions", markdown_table(summary["predictions"], columns)))
        return sections

    def plots(self, summary: dict[str, Any], records: list[SignTestRecord], plt: Any) -> dict[str, Any]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        measured = np.array([r.measured for r in records])
        for ax, name in zip(axes, PREDICTIONS):
            predicted = np.array([r.predicted[name] for r in records])
            ax.scatter(predicted, measured, s=6, alpha=0.5)
            ax.axhline(0, color="gray", lw=0.8)
            ax.axvline(0, color="gray", lw=0.8)
            ax.set_xlabel(f"predicted ({name})")
            ax.set_ylabel("measured logit change of T")
        return {"sign_scatter.png": fig}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r (None when either sample is constant)."""
    return float(sps.pearsonr(x, y)[0]) if np.ptp(x) > 0 and np.ptp(y) > 0 else None


def run_sign_test(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    head: int,
    *,
    config: SignTestConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[SignTestRecord]:
    """Run the single-position sign test at a head.

    Args:
        model: The hooked model.
        tokens: Prompts.
        layer: Matrix-recurrent layer.
        head: Head.
        config: Protocol choices.
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the prompts.
        **options: `SignTest`'s keyword arguments (``targets``).

    Returns:
        One `SignTestRecord` per triple and the summary (``summary["headline"]``).
    """
    return run_protocol(
        SignTest(model, tokens, layer, head, config=config, **options), out_dir, mode=mode, verbose=verbose
    )
