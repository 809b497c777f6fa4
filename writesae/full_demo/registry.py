"""The paper protocols of ``writesae demo --full``: one entry each, in report order.

An entry says how a protocol gets its inputs from the demo (`DemoContext`: the model, the cell
with the longest memory, the WriteSAEs on its states and writes, held-out stdlib text), at which
sizes it runs in ``--full`` (``sizes``) and in the quick check the tests run (``tiny``), which of
its summary's figures the overview shows, and when it does not apply to a model (with the reason,
which the report lists). Adding a protocol is adding one entry to `FULL_PROTOCOLS`.

Each protocol module exposes ``PAPER_REFERENCE`` (``table``, ``model``, ``value``) and its summary a
flat ``"headline"`` dict (docs/design.md §7). The three protocols that predate that contract (the
demo runs them itself) get their references and headlines here; their stages reuse the demo's runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context import DemoContext

__all__ = ["FULL_PROTOCOLS", "INPUTS", "FullProtocol", "ProtocolCall", "RunFn", "protocol_names"]

RunFn = Callable[[DemoContext, Path, str, dict[str, Any]], dict[str, Any]]
"""``run(ctx, out_dir, mode, sizes) -> summary``: run the protocol into ``out_dir`` (``mode`` as for
`writesae.protocols.run.run_protocol`) and return its summary."""


def _always(ctx: DemoContext) -> str | None:
    return None


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    return dict(summary["headline"])


@dataclass(frozen=True)
class FullProtocol:
    """One row of the full demo.

    Attributes:
        name: Its stage folder and row name (the subcommand's name).
        module: The protocol module (``writesae.protocols.substitution``); its ``PAPER_REFERENCE`` is
            cited unless ``reference`` is given.
        what: One line: what it measures.
        run: How it runs on the demo's inputs (see `RunFn`); None with ``demo_run``.
        sizes: Its sizes in ``--full`` (passed to ``run``).
        tiny: Its sizes in the quick check (``sizes`` updated with these).
        key_figures: Headline keys shown in the overview table, `fnmatch` patterns (default: the first three).
        headline: The flat headline from the summary (default: ``summary["headline"]``).
        applies: None when it applies to the model, else the reason it does not.
        reference: The paper's values, when the module has no ``PAPER_REFERENCE``: a list of
            ``{"table", "model", "value"}`` dicts.
        demo_run: The regular demo already runs it, into this folder of its own: the stage reads that
            run (no extra time) instead of running the protocol again.
    """

    name: str
    module: str
    what: str
    run: RunFn | None = None
    sizes: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    key_figures: tuple[str, ...] = ()
    headline: Callable[[dict[str, Any]], dict[str, Any]] = _headline
    applies: Callable[[DemoContext], str | None] = _always
    reference: tuple[dict[str, str], ...] = ()
    demo_run: str | None = None

    def references(self) -> list[dict[str, str]]:
        """The paper's values to cite (the module's ``PAPER_REFERENCE`` unless the entry gives its own)."""
        if self.reference:
            return list(self.reference)
        ref = getattr(importlib.import_module(self.module), "PAPER_REFERENCE", None)
        if ref is None:
            return [{"table": "?", "model": "?", "value": f"{self.module} has no PAPER_REFERENCE"}]
        return list(ref) if isinstance(ref, (list, tuple)) else [dict(ref)]

    def sizes_for(self, preset: str) -> dict[str, Any]:
        """``sizes`` (``preset="full"``) or ``sizes`` with ``tiny`` on top (``"tiny"``)."""
        return {**self.sizes, **(self.tiny if preset == "tiny" else {})}


# ----- the protocols the regular demo already runs: their stages read the demo's run directories, and the
# paper's values are given here (these modules predate the PAPER_REFERENCE contract)


def _substitution_headline(summary: dict[str, Any]) -> dict[str, Any]:
    h, p = summary["headline"], summary["partition"]
    return {"variant": h["variant"], "n_firings": h["n"], "win_rate": h["win_rate"], "wilson95": h["wilson95"],
            "strict_chain_rate": h["strict_chain_rate"], "cliffs_delta": h["cliffs_delta"],
            "wilcoxon_p": h["wilcoxon_p"],
            "median_kl_atom": h["median_kl"]["atom"]["median"], "median_kl_delete": h["median_kl"]["delete"]["median"],
            "median_kl_random": h["median_kl"]["random"]["median"], "registers": p["n_registers"],
            "bundles": p["n_bundles"]}  # fmt: skip


def _logit_shift_headline(summary: dict[str, Any]) -> dict[str, Any]:
    r2 = summary["median_r2"]
    return {"eps_unit": summary["eps_unit"], "median_r2_paper_formula": r2["out_proj"], "median_r2_exact": r2["exact"],
            "median_r2_triple_fit": summary["median_r2_triple_fit"], "n_cells": summary["n_cells"],
            "n_records": summary["n_records"]}  # fmt: skip


def _install_headline(summary: dict[str, Any]) -> dict[str, Any]:
    rows = summary["saturation"]
    at3 = min(rows, key=lambda row: abs(row["multiple"] - 3.0)) if rows else {}
    return {"multiple": at3.get("multiple"), "n_trials": at3.get("n"), "in_continuation": at3.get("in_continuation"),
            "in_base_continuation": at3.get("in_base_continuation"), "rank_improved": at3.get("rank_improved"),
            "median_logp_lift": at3.get("median_logp_lift"), "key": summary["key"],
            "direction": summary["direction"]}  # fmt: skip


_DEMO_PROTOCOLS = (
    FullProtocol(
        "substitution",
        "writesae.protocols.substitution",
        "per firing: the write replaced by the atom, deleted, or by a random control; KL to the unedited model",
        key_figures=("win_rate", "n_firings", "strict_chain_rate"),
        headline=_substitution_headline,
        demo_run="substitution",
        reference=(
            {
                "table": "Table 2",
                "model": "Qwen3.5-0.8B L1/L9/L17 H4",
                "value": "atom beats deletion on 92.4% of 4,851 firings (L9: 91.2%, Cliff's delta +0.825); strict "
                "chain "
                "89.5%; median KL atom 0.40, delete 1.09, random 2.02 at L9; 222 registers / 94 bundles",
            },
            {
                "table": "§6.2",
                "model": "Mamba-2-370M L24 H0",
                "value": "88.1% of 2,500 firings (Wilson [86.8, 89.3]); median KL atom 0.97, delete 1.62, random 2.32",
            },
        ),
    ),
    FullProtocol(
        "logit-shift",
        "writesae.protocols.logit_shift",
        "an atom added to a cached state: the later logit shift vs the paper's closed form and the exact first order",
        key_figures=("median_r2_paper_formula", "median_r2_exact", "median_r2_triple_fit"),
        headline=_logit_shift_headline,
        demo_run="logit_shift",
        reference=(
            {
                "table": "Fig. 7, App. A",
                "model": "Qwen3.5-0.8B L9 H4",
                "value": "median R^2 0.983 (IQR [0.977, 0.990]) over 200 (atom, eps) cells, with G fitted per "
                "(prompt, atom, token) triple",
            },
            {"table": "§4.4", "model": "Mamba-2-370M L24 H0", "value": "the same formula gives R^2 -0.07"},
        ),
    ),
    FullProtocol(
        "install",
        "writesae.protocols.install",
        "a target token's direction written at 3 positions, then greedy generation: inclusion, rank, log-prob lift",
        key_figures=("in_continuation", "in_base_continuation", "median_logp_lift"),
        headline=_install_headline,
        demo_run="install",
        reference=(
            {
                "table": "Tables 3, 20",
                "model": "Qwen3.5-0.8B L9 H4",
                "value": "at m = 3: target in continuation 25.0% pooled vs 8.3% native (ranks 100-1000: 100% vs "
                "33.3%); "
                "rank improved 77.4%; median first-step lift +1.27 nats",
            },
            {"table": "§5.5", "model": "Mamba-2-370M L24 H0", "value": "no lift over 3,600 trials; median lift ~0"},
        ),
    ),
)


# ----- the paper's other tables and figures (issue 15): one entry per protocol module


INPUT_SIZES = ("sequences", "seq_len", "train_sequences", "sae_heads", "sae_d_sae", "sae_k", "sae_epochs")
"""Size keys that size a protocol's inputs (held-out blocks; SAEs trained for it); the others are config fields."""


def _sized(cls: type, sizes: dict[str, Any]) -> Any:
    """``cls`` with the fields named in ``sizes``; a dict sizes a nested config (its other fields: the defaults)."""
    from dataclasses import MISSING, fields, is_dataclass, replace

    by_name = {f.name: f for f in fields(cls)}
    unknown = sorted(set(sizes) - set(by_name) - set(INPUT_SIZES))
    if unknown:
        raise ValueError(f"sizes {unknown} are neither fields of {cls.__name__} nor {INPUT_SIZES}")
    values = {}
    for name, value in sizes.items():
        if name not in by_name:
            continue
        f = by_name[name]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(value, dict) and is_dataclass(default):
            value = replace(default, **value)
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _head_saes(ctx: DemoContext, sizes: dict[str, Any]) -> dict[int, Any]:
    """One WriteSAE per head of the cell's layer (the demo's recipe, smaller), trained once and kept; with
    ``sae_heads`` set, only that many heads (the cell's first), for the quick check."""
    from writesae.outputs import holds_files
    from writesae.protocols.all_heads import train_head_saes

    folder = ctx.demo_dir / "paper" / "inputs" / "head_saes"
    tokens = ctx.tokens(sizes["train_sequences"], split="train")
    heads = list(range(ctx.model.cfg.n_heads))
    if sizes.get("sae_heads"):
        heads = sorted(sorted(heads, key=lambda h: h != ctx.head)[: sizes["sae_heads"]])
    return train_head_saes(ctx.model, tokens, ctx.layer, folder, heads=heads, d_sae=sizes["sae_d_sae"],
                           k=sizes["sae_k"], epochs=sizes["sae_epochs"], seed=ctx.seed, device=ctx.device,
                           mode="resume" if holds_files(folder) else "new")  # fmt: skip


INPUTS: dict[str, Callable[[DemoContext, dict[str, Any]], Any]] = {
    "model": lambda ctx, sizes: ctx.model,
    "sae": lambda ctx, sizes: ctx.sae,
    "tokens": lambda ctx, sizes: ctx.tokens(sizes["sequences"], sizes.get("seq_len")),
    "layer": lambda ctx, sizes: ctx.layer,
    "head": lambda ctx, sizes: ctx.head,
    "head_saes": _head_saes,
    "flat_sae": lambda ctx, sizes: ctx.train_sae("flat_sae", epochs=sizes.get("sae_epochs"), variant="flat"),
    "store": lambda ctx, sizes: ctx.demo_dir / "store_state",
}
"""What a protocol can take from the demo: its model, the WriteSAE on the cell's states (the paper's setting),
held-out text, the cell, one SAE per head of the cell's layer, a FlatSAE of the cell (the demo's recipe), the
demo's store of the cell's states."""


@dataclass(frozen=True)
class ProtocolCall:
    """A `RunFn` that calls ``module.function(*inputs, config=..., **keywords)``, each input named in `INPUTS`
    and the config (``module.config_cls``) built from the sizes (`config`)."""

    module: str
    function: str
    config_cls: str
    inputs: tuple[str, ...] = ("model", "sae", "tokens")
    keywords: tuple[str, ...] = ()

    def config(self, sizes: dict[str, Any]) -> Any:
        """The protocol's config: its defaults (the paper's settings) with the sizes of its fields."""
        return _sized(getattr(importlib.import_module(self.module), self.config_cls), sizes)

    def __call__(self, ctx: DemoContext, out_dir: Path, mode: str, sizes: dict[str, Any]) -> dict[str, Any]:
        args = [INPUTS[name](ctx, sizes) for name in self.inputs]
        extra = {name: INPUTS[name](ctx, sizes) for name in self.keywords}
        function = getattr(importlib.import_module(self.module), self.function)
        return function(*args, config=self.config(sizes), out_dir=out_dir, mode=mode, verbose=False, **extra).summary


def _readers_after_cell(kind: str) -> Callable[[DemoContext], str | None]:
    """None when a layer after the cell has ``kind`` ("attention" or "recurrent") heads, else why not."""

    def applies(ctx: DemoContext) -> str | None:
        cfg = ctx.model.cfg
        readable = set(cfg.recurrent_layers) if kind == "recurrent" else set(ctx.attention_layers)
        if any(layer > ctx.layer for layer in readable):
            return None
        return (f"no {kind} layer after the cell's layer {ctx.layer} (layer types {list(cfg.layer_types)}), so no "
                f"{kind} head can read its atoms")  # fmt: skip

    return applies


_PAPER_PROTOCOLS = (
    FullProtocol(
        "passage-nll",
        "writesae.protocols.passage_nll",
        "every register firing's write in a passage deleted, replaced by its atom, or by a random write: NLL change",
        ProtocolCall("writesae.protocols.passage_nll", "run_passage_nll", "PassageNLLConfig"),
        sizes={"sequences": 20},
        tiny={"sequences": 2},
        key_figures=("delete_bits_per_token", "random_bits_per_token", "holds_in"),
    ),
    FullProtocol(
        "reconstruction-ppl",
        "writesae.protocols.reconstruction_ppl",
        "the cell's state replaced by its SAE reconstruction after position P: perplexity change after P (the demo "
        "has one head's SAE, so one head, rank-1 atoms)",
        ProtocolCall("writesae.protocols.reconstruction_ppl", "run_reconstruction_ppl", "ReconstructionPPLConfig"),
        sizes={"sequences": 32, "position": 63},  # the demo's 128-token blocks: replaced after the first half
        tiny={"sequences": 2, "position": 23},
        key_figures=("rank-1_pct_change*", "zeroed_state_pct_change", "base_perplexity"),
    ),
    FullProtocol(
        "spectra",
        "writesae.protocols.spectra",
        "singular values of every head's state: sigma1/sigma2, effective and stable rank, write reuse (no SAE)",
        ProtocolCall("writesae.protocols.spectra", "run_spectra", "SpectraConfig", inputs=("model", "tokens")),
        sizes={"sequences": 16, "covariance_samples": 256},
        tiny={"sequences": 2, "covariance_samples": 64},
        key_figures=("median_sigma1_over_sigma2", "median_stable_rank", "most_rank1_cell"),
    ),
    FullProtocol(
        "flat-svd",
        "writesae.protocols.flat_svd",
        "a FlatSAE trained beside the WriteSAE (10 epochs, the WriteSAE's 20), its reconstruction's top-1 SVD "
        "substituted at its firings: win rates side by side (matched Frobenius norm)",
        ProtocolCall("writesae.protocols.flat_svd", "run_flat_svd", "FlatSVDConfig", keywords=("flat_sae",)),
        # The FlatSAE trains 10 epochs (the demo's WriteSAE 20; Table 6 matches them): on stdlib:mamba2 its 20
        # epochs alone would cost ~4 of the 20 minutes.
        sizes={
            "sequences": 32,
            "sae_epochs": 10,
            "substitution": {"n_atoms": 48, "n_bootstrap": 1000, "n_permutations": 2000},
        },
        tiny={
            "sequences": 4,
            "sae_epochs": 2,
            "substitution": {"n_atoms": 4, "n_bootstrap": 100, "n_permutations": 100},
        },
        key_figures=("writesae_win_rate", "flat_svd_win_rate", "delta_pp"),
    ),
    FullProtocol(
        "selectivity",
        "writesae.protocols.selectivity",
        "top-K logit changes of an atom perturbation vs matched-norm rank-1 controls (and two random controls "
        "against each other, the floor)",
        ProtocolCall("writesae.protocols.selectivity", "run_selectivity", "SelectivityConfig"),
        sizes={"sequences": 16, "n_atoms": 24, "max_firings_per_atom": 3},
        tiny={"sequences": 2, "n_atoms": 3, "max_firings_per_atom": 1},
        key_figures=("atom_vs_random", "random_vs_random", "atom_minus_random_floor"),
    ),
    FullProtocol(
        "preferred-token",
        "writesae.protocols.preferred_token",
        "a register atom's preferred token (from its firings' writes), erased at natural firings and written "
        "where the atom does not fire",
        ProtocolCall("writesae.protocols.preferred_token", "run_preferred_token", "PreferredTokenConfig"),
        sizes={"sequences": 32, "n_firings": 60, "n_nonfiring": 60, "n_bootstrap": 1000},
        tiny={"sequences": 2, "n_firings": 4, "n_nonfiring": 4, "n_bootstrap": 100},
        key_figures=("preferred_token", "erasure_median_delta_logp", "erasure_wilcoxon_p"),
    ),
    FullProtocol(
        "readers",
        "writesae.protocols.readers",
        "later attention heads ranked by how much removing a register atom moves their outputs, over matched-norm "
        "random edits (the paper's reader traces)",
        ProtocolCall("writesae.protocols.readers", "run_readers", "ReadersConfig"),
        sizes={"sequences": 16, "max_firings_per_atom": 10},
        tiny={"sequences": 2, "n_atoms": 1, "max_firings_per_atom": 2, "n_random": 1},
        key_figures=("median_top_ratio", "F*_top_reader"),
        applies=_readers_after_cell("attention"),
    ),
    FullProtocol(
        "readers-recurrent",
        "writesae.protocols.readers",
        "the same with later recurrent heads as the readers (an alternative to the paper's attention readers, "
        "for models whose later layers are recurrent)",
        ProtocolCall("writesae.protocols.readers", "run_readers", "ReadersConfig"),
        sizes={"sequences": 16, "max_firings_per_atom": 10, "reader_kinds": ("recurrent",)},
        tiny={"sequences": 2, "n_atoms": 1, "max_firings_per_atom": 2, "n_random": 1},
        key_figures=("median_top_ratio", "F*_top_reader"),
        applies=_readers_after_cell("recurrent"),
    ),
    FullProtocol(
        "sign-test",
        "writesae.protocols.sign_test",
        "a target token's direction v*_T written at one position: does the paper's closed form (and the exact first "
        "order) predict the sign of T's logit change?",
        ProtocolCall(
            "writesae.protocols.sign_test",
            "run_sign_test",
            "SignTestConfig",
            inputs=("model", "tokens", "layer", "head"),
        ),
        sizes={"sequences": 32, "positions_per_prompt": 4},
        tiny={"sequences": 2, "positions_per_prompt": 1},
        key_figures=("sign_agreement", "pearson_r", "exact_first_order_sign_agreement"),
    ),
    FullProtocol(
        "all-heads",
        "writesae.protocols.all_heads",
        "the substitution test on every head of the cell's layer, one smaller WriteSAE per head: per-head win "
        "rates, mean +- sd, heads above 85% / 88%",
        ProtocolCall(
            "writesae.protocols.all_heads", "run_all_heads", "AllHeadsConfig", inputs=("model", "head_saes", "tokens")
        ),
        sizes={
            "sequences": 16,
            "train_sequences": 24,
            "sae_d_sae": 256,
            "sae_k": 8,
            "sae_epochs": 3,
            "substitution": {"n_atoms": 16, "max_firings_per_atom": 5, "n_bootstrap": 500, "n_permutations": 1000},
        },
        tiny={
            "sequences": 2,
            "sae_heads": 2,
            "train_sequences": 8,
            "sae_d_sae": 32,
            "sae_k": 4,
            "sae_epochs": 1,
            "substitution": {"n_atoms": 2, "max_firings_per_atom": 2, "n_bootstrap": 100, "n_permutations": 100},
        },
        key_figures=("mean_win_rate", "sd_win_rate", "n_heads_above_0.85"),
    ),
    FullProtocol(
        "amplify",
        "writesae.protocols.amplification",
        "sentence-boundary atoms amplified in the state at every sampling step: newlines per 400 tokens against "
        "the baseline and dose-matched random atoms",
        ProtocolCall("writesae.protocols.amplification", "run_amplification", "AmplifyConfig"),
        sizes={"sequences": 12, "new_tokens": 160, "n_bootstrap": 1000},
        tiny={"sequences": 2, "new_tokens": 8, "n_features": 2, "doses": (5.0,), "n_bootstrap": 100},
        key_figures=("baseline_rate", "amplify_5x_rate", "random_*x_rate"),
    ),
    FullProtocol(
        "families",
        "writesae.protocols.families",
        "every SAE family (bilinear = WriteSAE, matrix, flat, tied, bilinear-flat) under TopK, and the WriteSAE "
        "under JumpReLU and gated sparsity too, trained on the demo's store of the cell at one budget: validation "
        "MSE, L0 and substitution win rate per family",
        ProtocolCall(
            "writesae.protocols.families",
            "run_families",
            "FamiliesConfig",
            inputs=("model", "tokens"),
            keywords=("store", "layer", "head"),
        ),
        sizes={
            "sequences": 12,
            "sparsities": ("topk", "jumprelu", "gated"),  # Table 7 under TopK; Table 5 on the WriteSAE alone
            "sparsity_variants": ("bilinear",),
            "seeds": (0,),
            "d_sae": 128,
            "k": 8,
            "epochs": 2,
            "trainer": {"input_scaling": "unit_mean_square", "lr": 2e-3, "batch_size": 128, "warmup_steps": 20},
            "substitution": {"n_atoms": 12, "max_firings_per_atom": 3, "n_bootstrap": 500, "n_permutations": 1000},
        },
        tiny={
            "sequences": 2,
            "variants": ("bilinear", "flat"),
            "d_sae": 32,
            "k": 4,
            "epochs": 1,
            "substitution": {"n_atoms": 2, "max_firings_per_atom": 2, "n_bootstrap": 100, "n_permutations": 100},
        },
        key_figures=("bilinear/topk_win_rate", "flat/topk_win_rate", "bilinear/topk_mse_over_flat",
                     "bilinear/jumprelu_val_l0", "bilinear/gated_val_l0"),
    ),
)


FULL_PROTOCOLS: tuple[FullProtocol, ...] = _DEMO_PROTOCOLS + _PAPER_PROTOCOLS
"""Every protocol of ``writesae demo --full``, in report order."""


def protocol_names() -> list[str]:
    return [entry.name for entry in FULL_PROTOCOLS]
