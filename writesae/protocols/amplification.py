"""Feature amplification during sampling (paper §5.4, Table 4): push chosen atoms into every decoding step.

The paper amplifies sentence-boundary features of a head and counts newlines in sampled text. Here:

1. Selection: on the selection sequences, each atom's score is its mean code on boundary tokens
   minus its mean code on the other tokens (codes of the state after reading the token; zeros
   count); the ``n_features`` highest scores are amplified (or the given ``features``).
2. Amplification: at every position whose logits choose a generated token (the last prompt position
   and every generated one), ``sum_i offset_i A_i`` is added to the head's state, with
   ``offset_i = dose * (mean code of atom i on boundary tokens)``. This is the paper's "encode, add
   an offset to the chosen codes, decode, add back the SAE's residual": the state changes by exactly
   that sum (the residual stream is untouched), and the recurrence carries each step's addition on.
3. Control: ``n_features`` other atoms that fire on the selection sequences, drawn at random, each
   given a selected atom's offset at ``control_dose`` (dose-matched).
4. Each prompt is sampled (temperature 0.7) under the baseline, every dose and the control, as one
   batch; the readout is the count of ``readout_text`` in the generated tokens (newlines by
   default; or a token set, ``readout_tokens``) per ``per_tokens`` tokens, with paragraphs and mean
   word length as surface checks when the model has a tokenizer.

Statistics over prompts, each condition paired with the baseline of the same prompt: bootstrap 95%
intervals of the mean, paired t-test (Bonferroni over the amplified doses), Cohen's d (paired).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.edits import add_to_states
from hooked_recurrent.fork import on_rows

from .activity import Activity, scan_activity
from .cell import sae_cell, trace_cell
from .checks import check_config
from .report import config_table, markdown_table
from .run import Protocol, ProtocolResult, run_protocol, token_fingerprint, unit_generator
from .stats import cluster_bootstrap, cohens_d_paired, paired_t_test

__all__ = [
    "PAPER_REFERENCE",
    "Amplification",
    "AmplifyConfig",
    "AmplifyRecord",
    "boundary_scores",
    "readout_weights",
    "run_amplification",
]

PAPER_REFERENCE = {
    "table": "Table 4 (§5.4, Fig. 6)",
    "model": "Qwen3.5-4B-Base L9, 32 heads, top-10 boundary features per head",
    "value": "newlines per 400 tokens 16.8 -> 11.2 at 5x (-33%, paired t p = 0.001, d = 0.55; Bonferroni p = 0.004); "
    "2x 12.7, 10x 13.4; random 10x 19.0",
}


@dataclass
class AmplifyConfig:
    """Choices of the amplification protocol (docs/design.md §5).

    Attributes:
        doses: Multiples of each feature's mean boundary code added at every step (paper: 2, 5, 10).
        control_dose: Dose of the random-feature control (None: the largest dose, the paper's 10x).
        n_features: Features amplified (paper: the top 10 per head).
        features: Amplify exactly these atoms instead of the top boundary scores.
        boundary_text: A token is a sentence boundary if its text, stripped, ends with one of these.
        readout_text: Counted in each generated token's text (paper: newlines).
        readout_tokens: Count these token ids instead (one each).
        per_tokens: The rate's unit: readout count per this many generated tokens (paper: 400).
        new_tokens: Tokens sampled after each prompt (paper: 400).
        prompt_length: Tokens of each prompt (the first ones of each sequence).
        temperature: Sampling temperature (paper: 0.7).
        dose_unit: ``"boundary_code"``: a dose multiplies each feature's mean code on boundary tokens
            (the paper's); ``"state_norm"``: it multiplies the median ``||S_t||_F`` of the head over the
            selection sequences, for every feature; ``"absolute"``: the dose is the offset.
        n_bootstrap: Bootstrap resamples of the intervals.
        seed: Seed of the sampling and of the control's features.
        prompts_per_unit: Prompts sampled together, every condition of each in one batch (one unit of
            the record log). The sampled tokens depend on it (one random stream per batch), so a
            resume must keep it; the statistics do not.
        scan_batch_size: Sequences encoded at once when scanning the codes.
    """

    doses: tuple[float, ...] = (2.0, 5.0, 10.0)
    control_dose: float | None = None
    n_features: int = 10
    features: tuple[int, ...] | None = None
    boundary_text: tuple[str, ...] = (".", "!", "?")
    readout_text: str = "\n"
    readout_tokens: tuple[int, ...] | None = None
    per_tokens: int = 400
    new_tokens: int = 400
    prompt_length: int = 32
    temperature: float = 0.7
    dose_unit: Literal["boundary_code", "state_norm", "absolute"] = "boundary_code"
    n_bootstrap: int = 2000
    seed: int = 2026
    prompts_per_unit: int = 8
    scan_batch_size: int = 8

    def __post_init__(self) -> None:
        check_config(self, positive=("doses", "control_dose", "n_features", "per_tokens", "new_tokens", "prompt_length",
                                     "temperature", "n_bootstrap", "prompts_per_unit", "scan_batch_size"),
                     nonempty=("doses",))  # fmt: skip

    @property
    def random_dose(self) -> float:
        return max(self.doses) if self.control_dose is None else self.control_dose


@dataclass
class AmplifyRecord:
    """One prompt sampled under one condition.

    Attributes:
        prompt: Prompt index.
        condition: ``"baseline"``, ``"amplify"`` or ``"random"``.
        dose: The dose (0 for the baseline).
        count: Readout count in the generated tokens.
        rate: ``count * per_tokens / new_tokens``.
        paragraphs: ``text.count("\\n\\n") + 1`` of the generated text (None without a tokenizer).
        word_length: Mean characters per whitespace-separated word (None without a tokenizer or words).
    """

    prompt: int
    condition: str
    dose: float
    count: float
    rate: float
    paragraphs: int | None
    word_length: float | None


def readout_weights(model: Any, config: AmplifyConfig) -> Float[Tensor, " d_vocab"]:
    """How much each token counts: occurrences of ``readout_text`` in its text, or 1 for ``readout_tokens``."""
    weights = torch.zeros(model.cfg.d_vocab)
    if config.readout_tokens is not None:
        weights[list(config.readout_tokens)] = 1.0
        return weights
    if model.tokenizer is None:
        raise ValueError("counting readout_text needs the model's tokenizer; give readout_tokens (token ids) instead")
    for i in range(model.cfg.d_vocab):
        weights[i] = model.tokenizer.decode([i]).count(config.readout_text)
    return weights


def _boundary_mask(model: Any, tokens: Tensor, boundary_text: tuple[str, ...]) -> Tensor:
    if model.tokenizer is None:
        raise ValueError(
            "finding sentence boundaries needs the model's tokenizer; give features= to skip the selection"
        )
    ids = sorted(set(tokens.flatten().tolist()))
    boundary = {i for i in ids if model.tokenizer.decode([i]).strip().endswith(boundary_text)}
    return torch.isin(tokens.cpu(), torch.tensor(sorted(boundary), dtype=tokens.dtype))


def boundary_scores(activity: Activity, boundary: Tensor) -> tuple[Float[Tensor, " d_sae"], Float[Tensor, " d_sae"]]:
    """Per atom: mean code on boundary positions minus mean code elsewhere, and the mean code on boundaries.

    Args:
        activity: The scan (its nonzero codes).
        boundary: ``[batch, pos]`` bool, the boundary positions of the scanned sequences.
    """
    on = boundary[activity.sequence, activity.position]
    n_on, n_off = int(boundary.sum()), boundary.numel() - int(boundary.sum())
    values = activity.value.double()
    sums_on = torch.zeros(activity.d_sae, dtype=torch.float64).index_add_(0, activity.atom[on], values[on])
    sums_off = torch.zeros(activity.d_sae, dtype=torch.float64).index_add_(0, activity.atom[~on], values[~on])
    mean_on = sums_on / max(n_on, 1)
    return mean_on - sums_off / max(n_off, 1), mean_on


class Amplification(Protocol[AmplifyRecord]):
    """The amplification protocol (run it with `run_protocol`, or `run_amplification`).

    Args:
        model: The hooked model the SAE belongs to.
        sae: A per-head WriteSAE.
        tokens: Sequences ``[batch, pos]``: each one's first ``prompt_length`` tokens are a prompt.
        config: Protocol choices.
        selection_tokens: Sequences on which features are selected and doses measured (default:
            ``tokens``; the paper uses a separate set).
    """

    name, title, record_type = "amplify", "Feature amplification during sampling", AmplifyRecord

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        config: AmplifyConfig | None = None,
        selection_tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> None:
        self.model, self.sae, self.tokens = model, sae, tokens
        self.config = config = config or AmplifyConfig()
        if tokens.shape[1] < config.prompt_length:
            raise ValueError(
                f"sequences of {tokens.shape[1]} tokens are shorter than prompt_length={config.prompt_length}"
            )
        self.cell, self.kind = sae_cell(model, sae)
        selection = tokens if selection_tokens is None else selection_tokens
        activity = scan_activity(model, sae, selection, self.cell, self.kind, batch_size=config.scan_batch_size)
        if config.features is None or config.dose_unit == "boundary_code":
            scores, boundary_code = boundary_scores(activity, _boundary_mask(model, selection, config.boundary_text))
        if config.features is None:
            self.features = [int(a) for a in scores.argsort(descending=True)[: config.n_features]]
        else:
            self.features = list(config.features)
        if config.dose_unit == "boundary_code":
            self.unit = [float(boundary_code[a]) for a in self.features]
        elif config.dose_unit == "state_norm":
            states = trace_cell(model, selection[: config.scan_batch_size], self.cell, with_states=True).states
            self.unit = [float(states.flatten(0, 1).flatten(1).norm(dim=-1).median())] * len(self.features)
        else:
            self.unit = [1.0] * len(self.features)
        alive = sorted(set(activity.atom.tolist()) - set(self.features))
        pool = alive or sorted(set(range(sae.cfg.d_sae)) - set(self.features))
        pick = torch.randperm(len(pool), generator=unit_generator(config.seed, "control"))[: len(self.features)]
        self.control = [pool[int(i)] for i in pick]
        with torch.no_grad():
            self.atoms = {a: sae.atom_matrices([a])[0].detach().float() for a in {*self.features, *self.control}}
        self.weights = readout_weights(model, config)

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "config": asdict(self.config),
            "model": self.model.cfg.model_name,
            "cell": {"layer": self.cell.layer, "head": self.cell.head, "sae_reads": self.kind},
            "sae": {"d_sae": self.sae.cfg.d_sae, "k": self.sae.cfg.k, "variant": self.sae.cfg.variant},
            "features": self.features,
            "control": self.control,
            "tokens": token_fingerprint(self.tokens),
        }

    def units(self) -> Iterable[tuple[str, Callable[[], list[AmplifyRecord]]]]:
        size = self.config.prompts_per_unit
        for first in range(0, self.tokens.shape[0], size):
            group = list(range(first, min(first + size, self.tokens.shape[0])))
            yield f"prompts-{group[0]}-{group[-1]}", lambda group=group: self._prompts(group)

    def _delta(self, atoms: list[int], dose: float) -> Tensor:
        return sum(dose * unit * self.atoms[a] for a, unit in zip(atoms, self.unit))

    @torch.no_grad()
    def _prompts(self, group: list[int]) -> list[AmplifyRecord]:
        """Sample every condition of every prompt of the group as one batch (condition-major rows)."""
        config, model = self.config, self.model
        prompts = self.tokens[group, : config.prompt_length]
        conditions = [("baseline", 0.0, None)] + [("amplify", d, self._delta(self.features, d)) for d in config.doses]
        conditions.append(("random", config.random_dose, self._delta(self.control, config.random_dose)))
        # Every state whose read picks a generated token: the last prompt position and each generated one.
        steps = list(range(config.prompt_length - 1, config.prompt_length + config.new_tokens - 1))
        name, n = self.cell.state_hook(model), len(group)
        hooks = [(name, on_rows(add_to_states(steps, delta), i * n, (i + 1) * n))
                 for i, (_, _, delta) in enumerate(conditions) if delta is not None]  # fmt: skip
        seed = unit_generator(config.seed, f"prompts-{group[0]}-{group[-1]}").initial_seed()
        generator = torch.Generator(device=prompts.device).manual_seed(seed)
        with model.hooks(fwd_hooks=hooks):
            out = model.generate(prompts.repeat(len(conditions), 1), config.new_tokens, do_sample=True,
                                 temperature=config.temperature, stop_at_eos=False, verbose=False, return_type="tokens",
                                 generator=generator)  # fmt: skip
        generated = out[:, config.prompt_length :].cpu()
        records = []
        for i, (condition, dose, _) in enumerate(conditions):
            for j, b in enumerate(group):
                records.append(self._record(b, condition, dose, generated[i * n + j]))
        return records

    def _record(self, b: int, condition: str, dose: float, generated: Tensor) -> AmplifyRecord:
        config, tokenizer = self.config, self.model.tokenizer
        count = float(self.weights[generated].sum())
        paragraphs = word_length = None
        if tokenizer is not None:
            text = tokenizer.decode(generated.tolist())
            words = text.split()
            paragraphs = text.count("\n\n") + 1
            word_length = float(np.mean([len(w) for w in words])) if words else None
        return AmplifyRecord(prompt=b, condition=condition, dose=dose, count=count,
                             rate=count * config.per_tokens / config.new_tokens, paragraphs=paragraphs,
                             word_length=word_length)  # fmt: skip

    # ------------------------------------------------------------------ summary

    def summarize(self, records: list[AmplifyRecord]) -> dict[str, Any]:
        config = self.config
        base = {r.prompt: r for r in records if r.condition == "baseline"}
        prompts = sorted(base)
        n_amplified = len(config.doses)
        rows = []
        keys = [("baseline", 0.0)] + [("amplify", d) for d in config.doses] + [("random", config.random_dose)]
        for condition, dose in keys:
            mine = {r.prompt: r for r in records if r.condition == condition and r.dose == dose}
            rates = np.asarray([mine[p].rate for p in prompts], float)
            baseline = np.asarray([base[p].rate for p in prompts], float)
            low, high = cluster_bootstrap(rates, prompts, n_resamples=config.n_bootstrap, seed=config.seed)
            row = {"condition": condition, "dose": dose, "n": len(prompts),
                   "rate": float(rates.mean()) if prompts else None, "ci95": [low, high],
                   "paragraphs": _mean([mine[p].paragraphs for p in prompts]),
                   "word_length": _mean([mine[p].word_length for p in prompts])}  # fmt: skip
            if condition != "baseline":
                t, p = paired_t_test(baseline, rates)
                bonferroni = min(1.0, p * n_amplified) if condition == "amplify" and np.isfinite(p) else None
                row.update(change=float((rates - baseline).mean()) if prompts else None, t=t, p=p,
                           p_bonferroni=bonferroni, cohens_d=cohens_d_paired(baseline, rates))  # fmt: skip
            rows.append(row)
        headline: dict[str, Any] = {"n_prompts": len(prompts), "features": ",".join(map(str, self.features)),
                                    "control": ",".join(map(str, self.control)),
                                    "baseline_rate": rows[0]["rate"]}  # fmt: skip
        for row in rows[1:]:
            tag = f"{row['condition']}_{row['dose']:g}x"
            headline.update({f"{tag}_rate": row["rate"], f"{tag}_p": row["p"], f"{tag}_d": row["cohens_d"]})
        return {"headline": headline, "conditions": rows, "per_tokens": config.per_tokens,
                "paper_reference": PAPER_REFERENCE}  # fmt: skip

    def report(self, summary: dict[str, Any], records: list[AmplifyRecord]) -> list[tuple[str, str]]:
        sections = [("Settings", config_table(self.config))]
        if not records:
            return sections + [("Results", "No prompts.")]
        ref, rows = PAPER_REFERENCE, summary["conditions"]
        what = repr(self.config.readout_text) if self.config.readout_tokens is None else "readout tokens"
        best = min(rows[1:-1], key=lambda r: r["p"] if r["p"] is not None and np.isfinite(r["p"]) else 2.0)
        sections.append(("Headline", (
            f"Features {self.features} of L{self.cell.layer} H{self.cell.head} amplified at every decoding step; "
            f"{what} per {summary['per_tokens']} tokens over {rows[0]['n']} prompts: baseline "
            f"**{rows[0]['rate']:.3g}**, "
            f"amplified at {best['dose']:g}x **{best['rate']:.3g}** (paired t p = {best['p']:.3g}, d = "
            f"{best['cohens_d']:.2f}), random features at {rows[-1]['dose']:g}x {rows[-1]['rate']:.3g}.\n\n"
            f"Paper ({ref['table']}, {ref['model']}; a different model): {ref['value']}.")))  # fmt: skip
        table = [{**r, "ci95": f"[{r['ci95'][0]:.3g}, {r['ci95'][1]:.3g}]"} for r in rows]
        columns = ["condition", "dose", "n", "rate", "ci95", "change", "p", "p_bonferroni", "cohens_d", "paragraphs",
                   "word_length"]  # fmt: skip
        sections.append(("Conditions", markdown_table(table, columns)))
        return sections

    def plots(self, summary: dict[str, Any], records: list[AmplifyRecord], plt: Any) -> dict[str, Any]:
        rows = summary["conditions"]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        labels = [f"{r['condition']}\n{r['dose']:g}x" for r in rows]
        means = [r["rate"] for r in rows]
        errors = np.asarray([[r["rate"] - r["ci95"][0], r["ci95"][1] - r["rate"]] for r in rows]).T
        ax.bar(range(len(rows)), means, yerr=errors, capsize=4,
               color=["gray"] + ["tab:blue"] * (len(rows) - 2) + ["tab:orange"])  # fmt: skip
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel(f"readout per {summary['per_tokens']} tokens (95% bootstrap CI)")
        fig.tight_layout()
        return {"amplify.png": fig}


def _mean(values: list[Any]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def run_amplification(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    config: AmplifyConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    **options: Any,
) -> ProtocolResult[AmplifyRecord]:
    """Amplify an SAE's boundary features while sampling, against the baseline and a dose-matched control.

    Args:
        model: The hooked model.
        sae: A per-head WriteSAE.
        tokens: Sequences whose first ``prompt_length`` tokens are the prompts.
        config: Protocol choices (`AmplifyConfig`).
        out_dir: The run directory (docs/design.md §7.2); None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see `run_protocol`).
        verbose: Progress bar over the prompts.
        **options: `Amplification`'s keyword arguments (``selection_tokens``).

    Returns:
        One `AmplifyRecord` per (prompt, condition) and the summary (``summary["headline"]``).
    """
    protocol = Amplification(model, sae, tokens, config=config, **options)
    return run_protocol(protocol, out_dir, mode=mode, verbose=verbose)
