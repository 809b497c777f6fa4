"""Installs during generation (paper §5.3): write a target token's direction into a head's memory.

For a target token ``T`` the paper's value-space direction is ``v*_T = normalize(W_O[h]^T W_U[T])``
(``direction="out_proj"``): the value a read must return for the head's output projection to push
the logits toward ``T``, ignoring the gated norm between the read and that projection, later layers
and the final norm. ``direction="readout"`` keeps the paper's construction but pulls ``W_U[T]`` back
through the head's whole readout at the reading position (its gated norm and the output projection,
by the exact Jacobian), still ignoring later layers and the final norm: on Mamba-2 the norm's gate
``silu(z)`` is small or negative on many coordinates, so ``W_O^T W_U[T]`` alone points partly the
wrong way. ``direction="logprob_gradient"`` uses the exact first-order direction:
``d log p_T / d o`` at the reading position (forward-mode AD through the hooked model). An install adds
``m * n_t * k^ v*_T^T`` to the head's write at ``window`` consecutive prompt positions, where
``k^`` is a unit key and ``n_t`` the norm of the native write there; the model then continues
greedily. Against the unedited continuation it measures whether ``T`` appears, ``T``'s rank and
log-probability at the first generated step, by class of ``T``'s initial rank, and over a sweep of
``m`` (saturation).

The key decides the sign. A later query ``q`` reads the install as ``(q . k^) v*_T``: with the
write's own key at the install position (``key="native"``) the reading query is nearly orthogonal
to it and negative about as often as positive, so the target is written with a random sign. The
default key is the query of the position that reads the install (the last prompt position, whose
logits choose the first generated token): ``key="reader_query"``. The paper does not say which key
it used; both are parameters, with the cosine of the key to the reading query in every record.
The norm convention is a parameter too: the paper's ``m * ||k_t v_t^T||`` leaves out the write's
strength (``norm="unscaled"``: Gated DeltaNet's ``beta_t``, Mamba-2's ``dt_t``), ``"native"``
keeps it.

Each prompt is walked once: the prefix before the earliest install runs once, then every trial
(and the unedited run, row 0) continues from a copy of it, batched, with greedy decoding.
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
from torch import Tensor

from hooked_recurrent.edits import add_to_writes
from hooked_recurrent.fork import on_rows
from hooked_recurrent.linear_response import LOGITS, linear_responses

from .cell import Cell, CellTrace, recurrent_cell, trace_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, unit_generator
from .walk import SequenceWalk

__all__ = ["InstallConfig", "InstallRecord", "Install", "run_install", "target_direction"]


@dataclass
class InstallConfig:
    """Choices of the install protocol (docs/design.md §5).

    Attributes:
        multiples: Install magnitudes ``m`` (paper: 1.5, 3, 6); a wider sweep shows saturation.
        window: Consecutive install positions (paper: 3).
        ends_from_last: Where each install window ends, counted back from the last prompt token
            (the paper uses 5 install positions it does not list).
        new_tokens: Greedy tokens generated (paper: 20).
        key: ``"reader_query"`` (the query of the last prompt position, which reads the install) or
            ``"native"`` (the write's own key at each install position).
        direction: ``"out_proj"``: the paper's ``normalize(W_O[h]^T W_U[T])``; ``"readout"``:
            ``normalize(J^T W_U[T])`` with ``J`` the Jacobian of the layer's output to the head's read at
            the reading position (the gated norm included); ``"logprob_gradient"``:
            ``normalize(d log p_T / d o)`` of the head's read at the reading position.
        norm: ``"unscaled"``: ``m`` times the native write's norm without its strength (the paper's
            ``||k_t v_t^T||``); ``"native"``: ``m`` times ``||k_t u_t^T||``.
        rank_classes: ``(name, low, high)``: targets whose initial rank (1 = top) is in
            ``[low, high)`` (``high`` None: no bound). Defaults: the paper's midrank and rare
            classes; its out-of-context "frequent" and "semantic" classes are not defined
            reproducibly. Classes beyond the vocabulary draw no targets.
        targets_per_class: Targets drawn per class and prompt (paper: 2).
        seed: Seed of the target draw.
    """

    multiples: tuple[float, ...] = (1.5, 3.0, 6.0)
    window: int = 3
    ends_from_last: tuple[int, ...] = (0, 1, 2, 4, 8)
    new_tokens: int = 20
    key: Literal["reader_query", "native"] = "reader_query"
    direction: Literal["out_proj", "readout", "logprob_gradient"] = "out_proj"
    norm: Literal["unscaled", "native"] = "unscaled"
    rank_classes: tuple[tuple[str, int, int | None], ...] = (("midrank", 100, 1000), ("rare", 10_000, None))
    targets_per_class: int = 2
    seed: int = 2026

    def __post_init__(self) -> None:
        check_config(self, positive=("multiples", "window", "new_tokens", "targets_per_class"),
                     nonnegative=("ends_from_last",), nonempty=("multiples", "ends_from_last", "rank_classes"))  # fmt: skip


@dataclass
class InstallRecord:
    """One install trial.

    Attributes:
        prompt: Prompt index.
        target: Target token.
        target_class: Name of its initial-rank class.
        install_end: Last install position.
        multiple: ``m``.
        key_query_cosine: Cosine of the install key to the reading query (1 for ``"reader_query"``),
            averaged over the window.
        in_continuation: The target appears in the greedy continuation after the install.
        in_base_continuation: It appears in the unedited continuation.
        rank_before: Its rank at the first generated step, unedited (1 = top).
        rank_after: Its rank there after the install.
        logp_lift: Its log-probability there, after minus before (nats).
    """

    prompt: int
    target: int
    target_class: str
    install_end: int
    multiple: float
    key_query_cosine: float
    in_continuation: bool
    in_base_continuation: bool
    rank_before: int
    rank_after: int
    logp_lift: float


def target_direction(model: Any, cell: Cell, token: int) -> Tensor:
    """``normalize(W_O[h]^T W_U[token])``: the read value that pushes the logits toward ``token``."""
    out_proj = model.mixer(cell.layer).head_output_weight(cell.head).detach().float()
    direction = out_proj.T @ model.W_U[:, token].detach().float()
    return torch.nn.functional.normalize(direction, dim=0).cpu()


def _rank(logits: Tensor, token: int) -> int:
    return int((logits > logits[token]).sum()) + 1


class Install(Protocol[InstallRecord]):
    """The install protocol (run it with `run_protocol`, or `run_install`).

    Args:
        model: The hooked model.
        prompts: Prompts without padding (one row each).
        layer: Matrix-recurrent layer of the head.
        head: Head index.
        targets: Target tokens for every prompt (default: drawn per prompt by initial-rank class).
        config: Protocol choices.
    """

    name, title, record_type = "install", "Installs during generation", InstallRecord

    def __init__(
        self,
        model: Any,
        prompts: Int[Tensor, "batch pos"],
        layer: int,
        head: int,
        *,
        targets: list[int] | None = None,
        config: InstallConfig | None = None,
    ) -> None:
        cell = recurrent_cell(model, layer, head)
        self.model, self.prompts, self.cell, self.targets = model, prompts, cell, targets
        self.config = config = config or InstallConfig()
        length = prompts.shape[1]
        self.ends = [length - 1 - e for e in config.ends_from_last if length - e - config.window >= 0]
        if not self.ends:
            raise ValueError(
                f"prompts of {length} tokens leave no room for a {config.window}-position window ending "
                f"{config.ends_from_last} tokens before the last; use longer prompts or smaller ends_from_last"
            )

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head},
            "targets": self.targets,
            "tokens": {"shape": list(self.prompts.shape), "sha1": hashlib.sha1(self.prompts.cpu().numpy().tobytes()).hexdigest()},
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[InstallRecord]]]]:
        for b in range(self.prompts.shape[0]):
            yield f"prompt-{b}", lambda b=b: self._prompt(b)

    # ------------------------------------------------------------------ one prompt

    def _draw_targets(self, logits: Tensor, generator: torch.Generator) -> list[tuple[int, str]]:
        if self.targets is not None:
            return [(t, "given") for t in self.targets]
        order = logits.argsort(descending=True)
        targets = []
        for name, low, high in self.config.rank_classes:
            pool = order[low - 1 : len(order) if high is None else min(high - 1, len(order))]
            picks = torch.randperm(len(pool), generator=generator)[: self.config.targets_per_class]
            targets += [(int(pool[p]), name) for p in picks]
        return targets

    def _directions(self, walk: SequenceWalk, prompt: Tensor, base_logits: Tensor, targets: list[int]) -> dict[int, Tensor]:
        """Each target's unit value direction (see ``InstallConfig.direction``)."""
        if self.config.direction == "out_proj":
            return {t: target_direction(self.model, self.cell, t) for t in targets}
        last = prompt.shape[1] - 1
        name = self.cell.hook_name(self.model, "hook_recurrence_out")
        layer_out = f"blocks.{self.cell.layer}.hook_attn_out"  # the mixer's output, added to the residual
        basis = torch.eye(self.model.cfg.d_v)
        responses = linear_responses(self.model, prompt[:, last:], name, last, basis, head=self.cell.head,
                                     cache=walk.cache_at(last), reads=[layer_out])  # fmt: skip
        if self.config.direction == "readout":
            readout = responses[layer_out][:, 0, 0].float().cpu()  # [d_v, d_model]: d layer output / d o
            unembed = self.model.W_U.detach().float().cpu()
            return {t: torch.nn.functional.normalize(readout @ unembed[:, t], dim=0) for t in targets}
        jacobian = responses[LOGITS][:, 0, 0].float().cpu()  # [d_v, d_vocab]
        expected = jacobian @ torch.softmax(base_logits.double(), -1).float()  # d E_p[logit] / d o
        return {t: torch.nn.functional.normalize(jacobian[:, t] - expected, dim=0) for t in targets}

    def _install(self, trace: CellTrace, direction: Tensor, end: int, multiple: float) -> tuple[dict[int, Tensor], float]:
        """The added writes ``{position: matrix}`` and the mean cosine of their keys to the reader."""
        reader = trace.query[0, -1].float()
        additions, cosines = {}, []
        for p in range(end - self.config.window + 1, end + 1):
            key = reader if self.config.key == "reader_query" else trace.key[0, p].float()
            norm = float(trace.key[0, p].norm() * trace.value[0, p].norm())
            if self.config.norm == "unscaled":
                norm /= max(float(trace.strength[0, p]), 1e-30)
            unit_key = torch.nn.functional.normalize(key, dim=0)
            additions[p] = multiple * norm * torch.outer(unit_key, direction)
            cosines.append(float(unit_key @ torch.nn.functional.normalize(reader, dim=0)))
        return additions, float(np.mean(cosines))

    @torch.no_grad()
    def _prompt(self, b: int) -> list[InstallRecord]:
        config, model = self.config, self.model
        prompt = self.prompts[b : b + 1]
        trace = trace_cell(model, prompt, self.cell, with_logits=True)
        base_logits = trace.logits[0, -1].float()
        targets = self._draw_targets(base_logits, unit_generator(config.seed, f"prompt-{b}"))
        trials = [(token, cls, end, m) for token, cls in targets for end in self.ends for m in config.multiples]
        if not trials:
            return []
        first = min(self.ends) - config.window + 1
        walk = SequenceWalk(model, prompt)
        cache = walk.cache_at(first).repeat(len(trials) + 1)  # row 0: unedited
        directions = self._directions(walk, prompt, base_logits, [token for token, _ in targets])
        hooks, cosines = [], []
        for row, (token, _, end, multiple) in enumerate(trials, start=1):
            additions, cosine = self._install(trace, directions[token], end, multiple)
            hooks.append((self.cell.write_hook(model), on_rows(add_to_writes(additions), row, row + 1)))
            cosines.append(cosine)
        rows = len(trials) + 1
        with model.hooks(fwd_hooks=hooks):
            logits = model(prompt[:, first:].repeat(rows, 1), cache=cache)[:, -1].float().cpu()
        first_logp = torch.log_softmax(logits.double(), -1)
        first_tokens = logits.argmax(-1)[:, None].to(prompt.device)  # the greedy first step, then the rest
        generated = model.generate(first_tokens, config.new_tokens - 1, do_sample=False, stop_at_eos=False, verbose=False,
                                   cache=cache, return_type="tokens").cpu()  # [rows, new_tokens]  # fmt: skip
        base = generated[0].tolist()
        base_logp = torch.log_softmax(base_logits.double(), -1)
        records = []
        for row, (token, cls, end, multiple) in enumerate(trials, start=1):
            records.append(InstallRecord(
                prompt=b, target=token, target_class=cls, install_end=end, multiple=multiple,
                key_query_cosine=cosines[row - 1],
                in_continuation=token in generated[row].tolist(),
                in_base_continuation=token in base,
                rank_before=_rank(base_logits, token),
                rank_after=_rank(logits[row], token),
                logp_lift=float(first_logp[row, token] - base_logp[token]),
            ))  # fmt: skip
        return records

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[InstallRecord]) -> dict[str, Any]:
        groups: dict[tuple[float, str], list[InstallRecord]] = {}
        for r in records:
            groups.setdefault((r.multiple, r.target_class), []).append(r)
            groups.setdefault((r.multiple, "pooled"), []).append(r)
        rows = [{"multiple": m, "target_class": cls, **_group_stats(rs)} for (m, cls), rs in sorted(groups.items())]
        pooled = [row for row in rows if row["target_class"] == "pooled"]
        return {
            "n_trials": len(records),
            "key": self.config.key,
            "direction": self.config.direction,
            "norm": self.config.norm,
            "median_key_query_cosine": float(np.median([r.key_query_cosine for r in records])) if records else None,
            "largest_multiple": pooled[-1] if pooled else None,
            "saturation": pooled,
            "groups": rows,
        }

    def report(self, summary: dict[str, Any], records: list[InstallRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Results", "No trials (no target fell in the rank classes).")]
        top = summary["largest_multiple"]
        sections.append((
            "Headline",
            f"Key `{summary['key']}` (median cosine to the reading query {summary['median_key_query_cosine']:.2f}), "
            f"direction `{summary['direction']}`, norm `{summary['norm']}`. At the largest multiple, m = {top['multiple']:g}: the target's rank improves in "
            f"**{top['rank_improved']:.1%}** of {top['n']} trials, median first-step log-prob lift "
            f"**{top['median_logp_lift']:+.2f} nats**, target in the continuation {top['in_continuation']:.1%} "
            f"(unedited {top['in_base_continuation']:.1%}).",
        ))  # fmt: skip
        columns = ["multiple", "target_class", "n", "in_continuation", "in_base_continuation", "rank_improved",
                   "median_rank_shift", "median_logp_lift"]  # fmt: skip
        sections.append(("Sweep over m (pooled)", markdown_table(summary["saturation"], columns)))
        sections.append(("By target class", markdown_table(summary["groups"], columns)))
        return sections

    def plots(self, summary: dict[str, Any], records: list[InstallRecord], plt: Any) -> dict[str, Any]:
        pooled = summary["saturation"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = [g["multiple"] for g in pooled]
        axes[0].plot(xs, [g["rank_improved"] for g in pooled], marker="o", label="rank improved")
        axes[0].plot(xs, [g["in_continuation"] for g in pooled], marker="o", label="target in continuation")
        axes[0].plot(xs, [g["in_base_continuation"] for g in pooled], marker="o", ls="--", label="... unedited")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].legend()
        axes[1].plot(xs, [g["median_logp_lift"] for g in pooled], marker="o")
        axes[1].axhline(0, color="gray", lw=0.8)
        axes[1].set_ylabel("median first-step log-prob lift (nats)")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("install magnitude m")
        return {"sweep.png": fig}


def _group_stats(records: list[InstallRecord]) -> dict[str, Any]:
    return {
        "n": len(records),
        "in_continuation": float(np.mean([r.in_continuation for r in records])),
        "in_base_continuation": float(np.mean([r.in_base_continuation for r in records])),
        "rank_improved": float(np.mean([r.rank_after < r.rank_before for r in records])),
        "median_rank_shift": float(np.median([r.rank_before - r.rank_after for r in records])),
        "median_logp_lift": float(np.median([r.logp_lift for r in records])),
    }


def run_install(
    model: Any,
    prompts: Int[Tensor, "batch pos"],
    layer: int,
    head: int,
    *,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[InstallRecord]:
    """Install target directions into a head's writes and generate greedily.

    Args:
        model: The hooked model.
        prompts: Prompts without padding (one row each).
        layer: Matrix-recurrent layer of the head.
        head: Head index.
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the prompts.
        **options: `Install`'s keyword arguments (``targets``, ``config``).

    Returns:
        The records (`InstallRecord`) and the summary.
    """
    return run_protocol(Install(model, prompts, layer, head, **options), out_dir, mode=mode, verbose=verbose)
