"""An atom's preferred token, erased at its natural firings and written where it does not fire (Tables 18-19, §5.1).

1. Detection. At each firing of the atom (a position where its code is nonzero), delete the cell's
   write and compare the next-token distributions: ``log p_native - log p_delete`` for every token
   id, summed over the firings. The token with the largest sum is the atom's preferred token (the
   paper: F412 prefers token 98818, "space", 14.5 nats summed).
2. Erasure at natural firings: the change of the preferred token's log-probability when the write
   is deleted (the paper: median -0.116 nats over 150 firings, 95% CI [-0.265, -0.042], paired
   Wilcoxon p = 1.07e-6; its rank 68,485 -> 77,444).
3. Writes at non-firing positions: add ``m * a* * A_i`` (``a*`` the atom's median natural code,
   ``m`` in 1, 2, 4) to the write where the atom does not fire (the paper: no magnitude significant,
   +3.1e-5 to +0.016 nats).

Detection runs once when the protocol is built (it is what chooses the token the records measure;
with ``detection="same"`` it uses the firings that are then erased, as the paper does, with
``"disjoint"`` a seeded half of them, so that the erasure is measured on firings that did not pick
the token). Each sequence is walked once (`writesae.protocols.walk`); the edits come from
`hooked_recurrent.edits`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.edits import add_to_writes, delete_writes

from .activity import Firing, partition_alive, scan_activity, select_firings
from .cell import sae_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol
from .stats import cluster_bootstrap, paired_wilcoxon
from .walk import SequenceWalk

__all__ = [
    "PAPER_REFERENCE",
    "PreferredToken",
    "PreferredTokenConfig",
    "PreferredTokenRecord",
    "detect_preferred_tokens",
    "run_preferred_token",
]

PAPER_REFERENCE: dict[str, str] = {
    "table": "Tables 18-19",
    "model": "Qwen3.5-0.8B L9 H4, atom F412",
    "value": "preferred token 98818 ('space'); erasure at 150 firings: median -0.116 nats (95% CI [-0.265, -0.042]), "
    "Wilcoxon p = 1.07e-6, rank 68,485 -> 77,444; writes at 150 non-firing positions, m = 1, 2, 4: "
    "+3.1e-5 (p 0.67), +0.008 (p 0.28), +0.016 (p 0.15)",
}
"""The paper's figures (paper-spec §5.1), for reports that put them beside a run's."""


@dataclass
class PreferredTokenConfig:
    """Choices of the preferred-token probe (defaults: the paper's; docs/design.md §5).

    Attributes:
        atom: The atom probed (the paper: F412, a register atom). None: the register atom (of the
            mixture partition of the alive atoms on the sequences) that fires at the most positions.
        register_threshold: ``None``: the mixture assigns registers; a number: a cosine threshold.
        n_firings: Natural firings erased (a seeded sample; the paper: 150).
        n_nonfiring: Positions where the atom does not fire that receive the write (paper: 150).
        multiples: ``m`` of the written ``m * a* * A_i`` (paper: 1, 2, 4).
        detection: ``"same"``: the token is detected on the firings that are erased (the paper);
            ``"disjoint"``: on a seeded half of the sampled firings, the erasure measured on the other half.
        offset: The next-token distribution read at ``position + offset`` (0: at the edited position).
        n_bootstrap: Bootstrap resamples of the median's interval.
        seed: Seed of the samples.
    """

    atom: int | None = None
    register_threshold: float | None = None
    n_firings: int = 150
    n_nonfiring: int = 150
    multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    detection: Literal["same", "disjoint"] = "same"
    offset: int = 0
    n_bootstrap: int = 2000
    seed: int = 2026

    def __post_init__(self) -> None:
        check_config(self, positive=("n_firings", "n_nonfiring", "multiples", "n_bootstrap"),
                     nonnegative=("atom", "offset", "register_threshold"), nonempty=("multiples",))  # fmt: skip


@dataclass
class PreferredTokenRecord:
    """One edited position.

    Attributes:
        kind: ``"erasure"`` (a natural firing, write deleted) or ``"write"`` (a non-firing position,
            ``multiple * a* * A_i`` added to the write).
        sequence: Sequence index.
        position: The edited position.
        multiple: ``m`` of a write (0 for an erasure).
        activation: The atom's code at the position (0 where it does not fire).
        logp_native: The preferred token's log-probability, unedited (nats).
        logp_edited: The same after the edit.
        rank_native: Its rank unedited (1 = top).
        rank_edited: Its rank after the edit.
    """

    kind: str
    sequence: int
    position: int
    multiple: float
    activation: float
    logp_native: float
    logp_edited: float
    rank_native: int
    rank_edited: int


def _rank(logits: Float[Tensor, " d_vocab"], token: int) -> int:
    return int((logits > logits[token]).sum()) + 1


@torch.no_grad()
def detect_preferred_tokens(
    model: Any, tokens: Int[Tensor, "batch pos"], write_hook: str, firings: list[Firing], offset: int = 0
) -> Float[Tensor, " d_vocab"]:
    """``sum over firings of (log p_native - log p_delete)`` per token id, the write deleted at each firing.

    Args:
        model: The hooked model.
        tokens: The sequences the firings index.
        write_hook: The cell's ``heads.{h}.hook_write``.
        firings: Where the write is deleted (one at a time).
        offset: The distribution read at ``position + offset``.
    """
    total = torch.zeros(model.cfg.d_vocab, dtype=torch.float64)
    for b in sorted({f.sequence for f in firings}):
        walk = SequenceWalk(model, tokens[b : b + 1])
        for t in sorted({f.position for f in firings if f.sequence == b}):
            logits = walk.fork_rows(t, [(0, []), (0, [(write_hook, delete_writes([t]))])], until=t + 1 + offset)
            log_p = torch.log_softmax(logits[:, offset].double().cpu(), dim=-1)
            total += log_p[0] - log_p[1]
    return total


class PreferredToken(Protocol[PreferredTokenRecord]):
    """The preferred-token probe (run it with `run_protocol`, or `run_preferred_token`).

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE (on ``hook_state`` or ``hook_write``).
        tokens: Held-out sequences (no padding).
        config: Protocol choices.
        preferred_token: Measure this token instead of detecting one.
    """

    name, title, record_type = "preferred-token", "An atom's preferred token: erasure and writes", PreferredTokenRecord

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        config: PreferredTokenConfig | None = None,
        preferred_token: int | None = None,
    ) -> None:
        self.model, self.sae, self.tokens = model, sae, tokens
        self.config = config = config or PreferredTokenConfig()
        self.cell, kind = sae_cell(model, sae)
        activity = scan_activity(model, sae, tokens, self.cell, kind)
        atom = config.atom
        if atom is None:
            registers = set(partition_alive(activity, config.register_threshold, config.seed).registers)
            counts = activity.firing_counts()
            ranked = sorted(registers, key=lambda a: (-int(counts[a]), a))
            if not ranked:
                raise ValueError("no register atom fires on these sequences; pass config.atom (or more sequences)")
            atom = ranked[0]
        self.atom = atom
        natural = activity.value[activity.atom == atom]
        if len(natural) == 0:
            raise ValueError(f"atom {atom} never fires on these sequences; pick an atom that does (or more sequences)")
        self.a_star = float(natural.median())
        valid = torch.ones(tokens.shape, dtype=torch.bool)
        if config.offset:
            valid[:, tokens.shape[1] - config.offset :] = False
        sampled = select_firings(activity, atoms=[atom], max_per_atom=config.n_firings, valid=valid, seed=config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        if config.detection == "disjoint":
            order = torch.randperm(len(sampled), generator=generator).tolist()
            half = len(sampled) // 2
            detect = [sampled[i] for i in order[:half]]
            self.erased = sorted((sampled[i] for i in order[half:]), key=lambda f: (f.sequence, f.position))
        else:
            detect = self.erased = sampled
        fires = torch.zeros(tokens.shape, dtype=torch.bool)
        fires[activity.sequence[activity.atom == atom], activity.position[activity.atom == atom]] = True
        candidates = (valid & ~fires).nonzero().tolist()
        picks = torch.randperm(len(candidates), generator=generator)[: config.n_nonfiring].tolist()
        self.nonfiring = sorted(tuple(candidates[i]) for i in picks)
        self.detection_scores: Tensor | None = None
        if preferred_token is None:
            self.detection_scores = detect_preferred_tokens(
                model, tokens, self.cell.write_hook(model), detect, config.offset
            )
            preferred_token = int(self.detection_scores.argmax())
        self.preferred_token = preferred_token
        with torch.no_grad():
            self.atom_matrix = sae.atom_matrices(torch.tensor([atom]))[0].detach().float().cpu()

    def settings(self) -> dict[str, Any]:
        meta = self.sae.cfg.metadata
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head, "hook": meta.hook_name},
            "sae": {"d_sae": self.sae.cfg.d_sae, "k": self.sae.cfg.k, "variant": self.sae.cfg.variant},
            "atom": self.atom,
            "a_star": self.a_star,
            "preferred_token": self.preferred_token,
            "tokens": {
                "shape": list(self.tokens.shape),
                "sha1": hashlib.sha1(self.tokens.cpu().numpy().tobytes()).hexdigest(),
            },
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[PreferredTokenRecord]]]]:
        sequences = sorted({f.sequence for f in self.erased} | {b for b, _ in self.nonfiring})
        for b in sequences:
            yield f"seq-{b}", lambda b=b: self._sequence(b)

    @torch.no_grad()
    def _sequence(self, b: int) -> list[PreferredTokenRecord]:
        config, token, hook = self.config, self.preferred_token, self.cell.write_hook(self.model)
        edits: dict[int, list[tuple[str, float, float, list]]] = {}  # position -> (kind, m, code, hooks)
        for f in self.erased:
            if f.sequence == b:
                edits.setdefault(f.position, []).append(
                    ("erasure", 0.0, f.activation, [(hook, delete_writes([f.position]))])
                )
        for s, t in self.nonfiring:
            if s == b:
                for m in config.multiples:
                    write = add_to_writes({t: m * self.a_star * self.atom_matrix})
                    edits.setdefault(t, []).append(("write", m, 0.0, [(hook, write)]))
        walk = SequenceWalk(self.model, self.tokens[b : b + 1])
        records = []
        for t in sorted(edits):
            conditions = [(0, [])] + [(0, hooks) for *_, hooks in edits[t]]
            logits = walk.fork_rows(t, conditions, until=t + 1 + config.offset)[:, config.offset].float().cpu()
            log_p = torch.log_softmax(logits.double(), dim=-1)[:, token]
            for i, (kind, m, code, _) in enumerate(edits[t], start=1):
                records.append(PreferredTokenRecord(
                    kind=kind, sequence=b, position=t, multiple=m, activation=code, logp_native=float(log_p[0]),
                    logp_edited=float(log_p[i]), rank_native=_rank(logits[0], token),
                    rank_edited=_rank(logits[i], token),
                ))  # fmt: skip
        return records

    # ------------------------------------------------------------------ summary

    def _token_text(self, token: int) -> str | None:
        tokenizer = getattr(self.model, "tokenizer", None)
        return None if tokenizer is None else tokenizer.decode([token])

    def _group(self, records: list[PreferredTokenRecord]) -> dict[str, Any]:
        native = np.array([r.logp_native for r in records])
        edited = np.array([r.logp_edited for r in records])
        delta = edited - native
        ranks_native = np.array([r.rank_native for r in records])
        ranks_edited = np.array([r.rank_edited for r in records])
        return {
            "n": len(records),
            "median_delta_logp": float(np.median(delta)),
            "median_ci95": cluster_bootstrap(
                delta,
                range(len(delta)),
                statistic=np.median,
                n_resamples=self.config.n_bootstrap,
                seed=self.config.seed,
            ),
            "mean_delta_logp": float(delta.mean()),
            "wilcoxon_p": paired_wilcoxon(edited, native),
            "native_median_rank": float(np.median(ranks_native)),
            "edited_median_rank": float(np.median(ranks_edited)),
            "median_rank_shift": float(np.median(ranks_edited - ranks_native)),
            "fraction_rank_worse": float((ranks_edited > ranks_native).mean()),
        }

    def summarize(self, records: list[PreferredTokenRecord]) -> dict[str, Any]:
        token = self.preferred_token
        summary: dict[str, Any] = {
            "atom": self.atom,
            "a_star": self.a_star,
            "preferred_token": token,
            "preferred_token_text": self._token_text(token),
            "detection": self.config.detection,
        }
        if self.detection_scores is not None:
            top = self.detection_scores.topk(min(5, len(self.detection_scores)))
            summary["detection_top5"] = [
                {"token": int(i), "text": self._token_text(int(i)), "summed_nats": float(v)}
                for v, i in zip(top.values, top.indices)
            ]
        erasure = [r for r in records if r.kind == "erasure"]
        summary["erasure"] = self._group(erasure) if erasure else {"n": 0}
        summary["writes"] = [
            {"multiple": m, **self._group(rs)}
            for m in self.config.multiples
            if (rs := [r for r in records if r.kind == "write" and r.multiple == m])
        ]
        headline: dict[str, Any] = {"atom": self.atom, "preferred_token": token, "a_star": self.a_star}
        if erasure:
            e = summary["erasure"]
            headline.update({
                "n_firings": e["n"], "erasure_median_delta_logp": e["median_delta_logp"],
                "erasure_ci95": e["median_ci95"], "erasure_mean_delta_logp": e["mean_delta_logp"],
                "erasure_wilcoxon_p": e["wilcoxon_p"], "native_median_rank": e["native_median_rank"],
                "erased_median_rank": e["edited_median_rank"],
            })  # fmt: skip
        for w in summary["writes"]:
            headline[f"write_{w['multiple']:g}x_median_delta_logp"] = w["median_delta_logp"]
            headline[f"write_{w['multiple']:g}x_wilcoxon_p"] = w["wilcoxon_p"]
        summary["headline"] = headline
        return summary

    def report(self, summary: dict[str, Any], records: list[PreferredTokenRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        text = summary["preferred_token_text"]
        shown = f"{summary['preferred_token']}" + ("" if text is None else f" ({text!r})")
        e = summary["erasure"]
        if e["n"]:
            sections.append((
                "Headline",
                (f"Atom {self.atom} (a* = {self.a_star:.3g}) prefers token {shown}. Deleting the write at {e['n']} "
                 f"natural firings changes its log-probability by a median **{e['median_delta_logp']:+.4f}** nats (95% "
                 f"[{e['median_ci95'][0]:+.4f}, {e['median_ci95'][1]:+.4f}]; mean {e['mean_delta_logp']:+.4f}; paired "
                 f"Wilcoxon p = {e['wilcoxon_p']:.3g}); its median rank {e['native_median_rank']:g} -> "
                 f"{e['edited_median_rank']:g}. "
                 f"Paper ({PAPER_REFERENCE['model']}, a different model): {PAPER_REFERENCE['value']}."),
            ))  # fmt: skip
        if "detection_top5" in summary:
            sections.append(("Detection (summed log p_native - log p_delete)",
                             markdown_table(summary["detection_top5"], ["token", "text", "summed_nats"])))  # fmt: skip
        columns = ["multiple", "n", "median_delta_logp", "mean_delta_logp", "wilcoxon_p", "native_median_rank",
                   "edited_median_rank", "median_rank_shift"]  # fmt: skip
        sections.append(("Writes m * a* * A at non-firing positions", markdown_table(summary["writes"], columns)))
        return sections

    def plots(self, summary: dict[str, Any], records: list[PreferredTokenRecord], plt: Any) -> dict[str, Any]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        groups = [("erasure", [r for r in records if r.kind == "erasure"])]
        groups += [
            (f"write {m:g}x", [r for r in records if r.kind == "write" and r.multiple == m])
            for m in self.config.multiples
        ]
        groups = [(name, rs) for name, rs in groups if rs]
        ax.boxplot([[r.logp_edited - r.logp_native for r in rs] for _, rs in groups], showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1), [name for name, _ in groups])
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_ylabel(f"change of log p(token {summary['preferred_token']}) (nats)")
        ax.set_title(f"atom {self.atom}")
        return {"preferred_token.png": fig}


def run_preferred_token(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: PreferredTokenConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[PreferredTokenRecord]:
    """Detect an atom's preferred token, erase it at the atom's firings and write the atom where it does not fire.

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE.
        tokens: Held-out sequences.
        config: Protocol choices.
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the sequences.
        **options: `PreferredToken`'s keyword arguments (``preferred_token``).

    Returns:
        One `PreferredTokenRecord` per edit and the summary (``summary["headline"]``).
    """
    return run_protocol(
        PreferredToken(model, sae, tokens, config=config, **options), out_dir, mode=mode, verbose=verbose
    )
