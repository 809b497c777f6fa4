"""SAE families at a matched budget: validation MSE and substitution win rate per family (paper Tables
5 and 7, Fig. 8; §2.2-2.7, §6.10).

A family is an encoder/decoder pair (`writesae.config.VARIANTS`: ``bilinear`` = WriteSAE, ``matrix``
= dense encoder + rank-1 decoder, ``flat`` = FlatSAE, ``bilinear_tied``, ``bilinear_flat`` = matched-filter
encoder + dense decoder) and a sparsity (`writesae.config.SPARSITIES`: ``topk``, ``batchtopk``, and Table 5's
``jumprelu`` and ``gated``, whose penalty settings come in through ``FamiliesConfig.trainer``; they ignore
``k``, so compare their ``val_l0``). Every family is trained on the same store, cell and schedule for each
seed, through the sweep's `train_cell` (so the cells resume, and land in a sweep-shaped folder); each
trained SAE then runs the substitution test on held-out tokens (dense decoders, flat and bilinear_flat,
through their top-1 SVD, `writesae.protocols.flat_svd`), and its register / bundle partition gives Fig. 8's
cosines. One record per (family, seed); the summary averages the seeds.

The paper's Gated SAEs failed to train (its negative result); here they train with the standard hard gate
or the reference code's soft one (``trainer={"gate": ...}``), and whether they fail the same way is what
the records show. Not built: the paper's third gate, "hard + STE" (a straight-through hard gate).

The budget (``FamiliesConfig.budget``, docs/design.md §5): ``"n_features"`` (the paper's Table 7:
the same ``d_sae``, ``k``, optimiser and epochs for every family) or ``"parameters"`` (each family
gets the ``d_sae`` whose parameter count matches the reference family's at ``d_sae``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jaxtyping import Int
from torch import Tensor

from writesae.config import SPARSITIES, VARIANTS, has_factor_decoder
from writesae.sweep.runner import SubstitutionTest as SweepSubstitution

from .checks import check_config
from .report import markdown_table
from .run import Protocol, ProtocolResult, run_protocol
from .substitution import SubstitutionConfig, SubstitutionTest

__all__ = ["PAPER_REFERENCE", "FamiliesConfig", "FamilyRecord", "Families", "run_families", "parameters_per_atom",
           "matched_d_sae"]  # fmt: skip

PAPER_REFERENCE: dict[str, str] = {
    "table": "Tables 5 and 7, Fig. 8",
    "model": "Qwen3.5-0.8B L9 (16 heads x 3 seeds), n_f 2048, k 32, 20 epochs",
    "value": "val MSE x1e-5 at L9: flat 2.58, rank-1 (matrix) 2.69, bilinear 3.09, bilinear-flat 3.35, tied 5.98; "
    "register cos BatchTopK 0.262 vs JumpReLU 0.189, bundle 0.009 vs 0.0018",
}


def _table_substitution() -> SubstitutionConfig:
    return SubstitutionConfig(max_firings_per_atom=30)


@dataclass
class FamiliesConfig:
    """Choices of the family comparison (defaults: the paper's Table 7; docs/design.md §5).

    Attributes:
        variants: Encoder/decoder families (default: every WriteSAE variant).
        sparsities: Sparsity kinds (paper Table 7: TopK; Table 5 compares BatchTopK with JumpReLU;
            ``"gated"`` is the paper's negative result). JumpReLU and gated SAEs ignore ``k``.
        sparsity_variants: The variants trained under every sparsity; the other variants train under the
            first sparsity only (None: every variant under every sparsity). The paper compares the
            families under TopK (Table 7) and the sparsity kinds on the WriteSAE alone (Table 5), which is
            ``sparsities=("topk", "jumprelu", "gated"), sparsity_variants=("bilinear",)``.
        seeds: Seeds, one SAE per (family, seed) (paper: 0, 1, 42).
        d_sae: Atoms (paper: 2,048); at ``budget="parameters"``, the reference family's.
        k: Active atoms per sample (paper: 32).
        epochs: Epochs (paper: 20).
        budget: ``"n_features"``: every family at ``d_sae`` (paper); ``"parameters"``: each family's
            ``d_sae`` matches the reference family's parameter count.
        reference_variant: The family whose parameters the others match.
        trainer: Further `TrainerConfig` fields, the same for every family (e.g.
            ``{"input_scaling": "unit_mean_square", "lr": 2e-3}``, the demo's recipe for small models);
            the ``jumprelu_*`` and ``gated_*``/``gate*`` fields reach only the families of that sparsity, and
            so does ``jumprelu_init_threshold`` (an SAE config field, the one allowed here).
        substitution: The substitution test of every SAE (None: val MSE only).
        flat_svd_of: How dense decoders (flat, bilinear_flat) are substituted: ``"reconstruction"`` /
            ``"atom"`` top-1 SVD (see `writesae.protocols.flat_svd`), or ``"none"``: the dense atom as it is.
    """

    variants: tuple[str, ...] = VARIANTS
    sparsities: tuple[str, ...] = ("topk",)
    sparsity_variants: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 42)
    d_sae: int = 2048
    k: int = 32
    epochs: int = 20
    budget: Literal["n_features", "parameters"] = "n_features"
    reference_variant: str = "bilinear"
    trainer: dict[str, Any] = field(default_factory=dict)
    substitution: SubstitutionConfig | None = field(default_factory=_table_substitution)
    flat_svd_of: Literal["reconstruction", "atom", "none"] = "reconstruction"

    def __post_init__(self) -> None:
        from writesae.sweep.grid import TRAINER_KEYS

        trainer_keys = (*TRAINER_KEYS, "jumprelu_init_threshold")
        check_config(self, positive=("d_sae", "k", "epochs"), nonnegative=("seeds",))
        for name, values, allowed in (("variants", self.variants, VARIANTS),
                                      ("sparsities", self.sparsities, SPARSITIES)):  # fmt: skip
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty subset of {list(allowed)} (got {list(values)})")
        if self.sparsity_variants is not None and not set(self.sparsity_variants) <= set(self.variants):
            raise ValueError(f"sparsity_variants must be among variants {list(self.variants)} (got "
                             f"{list(self.sparsity_variants)}); None trains every variant under every sparsity")  # fmt: skip
        if self.budget not in ("n_features", "parameters"):
            raise ValueError(f"budget must be 'n_features' or 'parameters' (got {self.budget!r})")
        if self.reference_variant not in VARIANTS:
            raise ValueError(f"reference_variant must be one of {list(VARIANTS)} (got {self.reference_variant!r})")
        if self.flat_svd_of not in ("reconstruction", "atom", "none"):
            raise ValueError(f"flat_svd_of must be 'reconstruction', 'atom' or 'none' (got {self.flat_svd_of!r})")
        unknown = sorted(set(self.trainer) - set(trainer_keys))
        if unknown:
            raise ValueError(f"trainer takes TrainerConfig fields and jumprelu_init_threshold {list(trainer_keys)}; "
                             f"unknown: {unknown}")  # fmt: skip
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"seeds must be distinct, and at least one (got {list(self.seeds)})")


def parameters_per_atom(variant: str, d_k: int, d_v: int, rank: int = 1, sparsity: str = "topk") -> int:
    """Trainable parameters one atom adds (encoder, decoder, ``b_enc``); every SAE adds ``b_dec`` (``d_k d_v``).

    Flat: ``2 d_in + 1``; matrix (dense encoder, rank-r decoder): ``d_in + r (d_k + d_v) + 1``;
    bilinear: ``2 r (d_k + d_v) + 1``; tied bilinear: ``r (d_k + d_v) + 1`` (paper App. C); bilinear_flat
    (rank-r matched filter, dense decoder): ``r (d_k + d_v) + d_in + 1``. JumpReLU adds a threshold per
    atom, a gated SAE ``r_mag`` and ``b_mag`` (the parameter budget leaves these out).
    """
    d_in, factors = d_k * d_v, rank * (d_k + d_v)
    per_atom = {"flat": 2 * d_in, "matrix": d_in + factors, "bilinear": 2 * factors, "bilinear_tied": factors,
                "bilinear_flat": factors + d_in}  # fmt: skip
    return per_atom[variant] + 1 + {"jumprelu": 1, "gated": 2}.get(sparsity, 0)


def matched_d_sae(variant: str, reference: str, d_sae: int, d_k: int, d_v: int, k: int) -> int:
    """The ``d_sae`` at which ``variant`` has at most the parameters of ``reference`` at ``d_sae`` (and >= k)."""
    budget = d_sae * parameters_per_atom(reference, d_k, d_v)
    return max(k, budget // parameters_per_atom(variant, d_k, d_v))


@dataclass
class FamilyRecord:
    """One trained SAE (a family at a seed) and its measurements.

    Attributes:
        family: ``"{variant}/{sparsity}"``.
        variant: Encoder/decoder pair.
        sparsity: Sparsity kind.
        seed: Seed.
        d_sae: Atoms.
        n_parameters: Trainable parameters of the SAE.
        val_mse: Validation MSE of the kept (best) weights.
        val_explained_variance: Their explained variance.
        val_dead_fraction: Atoms that never fire on the validation split.
        val_l0: Mean active atoms per sample.
        win_rate: Substitution win rate (headline variant), None without firings or test.
        n_firings: Firings tested.
        n_alive: Atoms that fire on the held-out tokens.
        n_registers: Registers among them.
        register_median_cosine: Median over registers of their median cosine to the write.
        bundle_median_cosine: The same over bundles.
        seconds: Training and test time.
    """

    family: str
    variant: str
    sparsity: str
    seed: int
    d_sae: int
    n_parameters: int
    val_mse: float
    val_explained_variance: float
    val_dead_fraction: float
    val_l0: float
    win_rate: float | None
    n_firings: int
    n_alive: int | None
    n_registers: int | None
    register_median_cosine: float | None
    bundle_median_cosine: float | None
    seconds: float


class _CellSubstitution(SweepSubstitution):
    """What `writesae.sweep.runner.train_cell` calls on each trained SAE: the substitution test on this
    protocol's model and tokens, with its config (the sweep's own loads them by name)."""

    def __init__(self, model: Any, tokens: Tensor, config: FamiliesConfig, attention_mask: Tensor | None) -> None:
        self.model, self.tokens, self.config, self.attention_mask = model, tokens, config, attention_mask

    def win_rate(self, sae: Any, out_dir: Path) -> dict[str, Any]:
        from writesae.outputs import holds_files

        from .flat_svd import flat_svd_test

        config, options = self.config, {"config": self.config.substitution, "attention_mask": self.attention_mask}
        if not has_factor_decoder(sae.cfg.variant) and config.flat_svd_of != "none":
            test = flat_svd_test(self.model, sae, self.tokens, config.flat_svd_of, **options)
        else:
            test = SubstitutionTest(self.model, sae, self.tokens, **options)
        summary = run_protocol(test, out_dir, mode="resume" if holds_files(out_dir) else "new", verbose=False).summary
        part = summary["partition"]
        return {"win_rate": summary.get("headline", {}).get("win_rate"), "n_firings": summary["n_firings"],
                "n_alive": part["n_alive"], "n_registers": part["n_registers"],
                "register_median_cosine": part["register_median_cosine"],
                "bundle_median_cosine": part["bundle_median_cosine"]}  # fmt: skip


class Families(Protocol[FamilyRecord]):
    """Train every family at every seed on one store cell and measure it (`run_families`).

    Args:
        model: The hooked model the store was collected from.
        tokens: Held-out sequences for the substitution test.
        store: A store (or its folder) from `writesae.store.collect` holding the cell.
        layer: The cell's layer (default: the store's only cell).
        head: The cell's head.
        config: The comparison's choices.
        cells_dir: Where the trained cells go (``{cells_dir}/{cell id}``: training, SAE,
            substitution run); `run_families` puts them in the run directory.
        device: Where the SAEs train.
        attention_mask: Padding mask of ``tokens``.
    """

    name, title, record_type = "families", "SAE families at a matched budget (Tables 5, 7; Fig. 8)", FamilyRecord

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "batch pos"],
        store: Any,
        *,
        layer: int | None = None,
        head: int | None = None,
        config: FamiliesConfig | None = None,
        cells_dir: str | Path | None = None,
        device: str = "cpu",
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> None:
        from writesae.store import WriteStore
        from writesae.sweep.grid import SweepGrid
        from writesae.sweep.runner import store_digest

        self.model, self.tokens, self.device = model, tokens, device
        self.config = config = config or FamiliesConfig()
        self.store = store if isinstance(store, WriteStore) else WriteStore(store)
        cells = list(self.store.manifest["cells"])
        if layer is None or head is None:
            if len(cells) != 1:
                raise ValueError(f"store {self.store.path} holds cells {cells}: pass layer= and head=")
            layer, head = (int(part[1:]) for part in cells[0].split("_"))
        self.layer, self.head = layer, head
        d_k, d_v = self.store.manifest["model"]["d_k"], self.store.manifest["model"]["d_v"]
        self.sizes = {v: config.d_sae if config.budget == "n_features" else
                      matched_d_sae(v, config.reference_variant, config.d_sae, d_k, d_v, config.k)
                      for v in config.variants}  # fmt: skip
        digest = store_digest(self.store)
        self.cells = []
        for variant in config.variants:
            fixed = {"layer": layer, "head": head, "d_sae": self.sizes[variant], "k": config.k, "epochs": config.epochs,
                     **config.trainer}  # fmt: skip
            every = config.sparsity_variants is None or variant in config.sparsity_variants
            grid = {"variant": [variant], "sparsity": list(config.sparsities if every else config.sparsities[:1]),
                    "seed": list(config.seeds)}  # fmt: skip
            sweep = SweepGrid.from_dict({"store": str(self.store.path), "grid": grid, "fixed": fixed})
            self.cells += sweep.cells(digest)
        self.cells_dir = Path(cells_dir) if cells_dir is not None else Path(tempfile.mkdtemp(prefix="families-"))
        self.substitution = (None if config.substitution is None else
                             _CellSubstitution(model, tokens, config, attention_mask))  # fmt: skip

    def settings(self) -> dict[str, Any]:
        from writesae.sweep.runner import store_digest

        config = {k: v for k, v in vars(self.config).items() if k != "substitution"}
        sub = self.config.substitution
        return {
            "protocol": self.name,
            "config": {**config, "substitution": None if sub is None else vars(sub)},
            "model": self.model.cfg.model_name,
            "store": {"path": str(self.store.path), "digest": store_digest(self.store)},
            "cell": {"layer": self.layer, "head": self.head},
            "d_sae": self.sizes,
            "tokens": {"shape": list(self.tokens.shape)},
        }

    def units(self):  # noqa: ANN201
        for cell in self.cells:
            yield cell.id, lambda cell=cell: [self._train(cell)]

    def _train(self, cell: Any) -> FamilyRecord:
        from writesae.sae import WriteSAE
        from writesae.sweep.runner import train_cell

        start = time.time()
        folder = self.cells_dir / cell.id
        row = train_cell(cell, self.store, folder, self.device, self.substitution)
        sae = WriteSAE.load_from_disk(folder / "sae")
        variant, sparsity = cell.settings["variant"], cell.settings["sparsity"]
        return FamilyRecord(
            family=f"{variant}/{sparsity}", variant=variant, sparsity=sparsity, seed=cell.seed,
            d_sae=cell.settings["d_sae"], n_parameters=sum(p.numel() for p in sae.parameters()),
            val_mse=row["val_mse"], val_explained_variance=row["val_explained_variance"],
            val_dead_fraction=row["val_dead_fraction"], val_l0=row["val_l0"], win_rate=row.get("win_rate"),
            n_firings=row.get("n_firings", 0), n_alive=row.get("n_alive"), n_registers=row.get("n_registers"),
            register_median_cosine=row.get("register_median_cosine"),
            bundle_median_cosine=row.get("bundle_median_cosine"),
            seconds=round(time.time() - start, 2),
        )  # fmt: skip

    def summarize(self, records: list[FamilyRecord]) -> dict[str, Any]:
        families: dict[str, list[FamilyRecord]] = {}
        for r in records:
            families.setdefault(r.family, []).append(r)
        rows = []
        for family, rs in families.items():
            first = rs[0]
            row: dict[str, Any] = {"family": family, "variant": first.variant, "sparsity": first.sparsity,
                                   "n_seeds": len(rs), "d_sae": first.d_sae, "n_parameters": first.n_parameters}
            for metric in ("val_mse", "val_explained_variance", "val_dead_fraction", "val_l0", "win_rate",
                           "register_median_cosine", "bundle_median_cosine"):  # fmt: skip
                values = np.array([getattr(r, metric) for r in rs if getattr(r, metric) is not None], dtype=float)
                row[metric] = float(values.mean()) if len(values) else None
                row[f"{metric}_sd"] = float(values.std()) if len(values) > 1 else None
            row["n_firings"] = int(sum(r.n_firings for r in rs))
            rows.append(row)
        headline: dict[str, Any] = {"budget": self.config.budget, "n_sae": len(records)}
        ranked = [r for r in rows if r["val_mse"] is not None]
        if ranked:
            headline["lowest_val_mse"] = min(ranked, key=lambda r: r["val_mse"])["family"]
        rated = [r for r in rows if r["win_rate"] is not None]
        if rated:
            headline["highest_win_rate"] = max(rated, key=lambda r: r["win_rate"])["family"]
        for r in rows:
            headline[f"{r['family']}_val_mse"] = r["val_mse"]
            headline[f"{r['family']}_win_rate"] = r["win_rate"]
            if r["sparsity"] in ("jumprelu", "gated"):  # no k: their L0 is what they learned (Table 5)
                headline[f"{r['family']}_val_l0"] = r["val_l0"]
        for sparsity in self.config.sparsities:  # the paper's "rank-1 within 8% of flat" reads as these ratios
            flat = next((r for r in rows if r["family"] == f"flat/{sparsity}"), None)
            for r in rows:
                if flat and flat["val_mse"] and r["sparsity"] == sparsity and r["variant"] != "flat":
                    headline[f"{r['family']}_mse_over_flat"] = r["val_mse"] / flat["val_mse"]
        return {"headline": headline, "families": rows, "paper_reference": PAPER_REFERENCE}

    def report(self, summary: dict[str, Any], records: list[FamilyRecord]) -> list[tuple[str, str]]:
        settings = markdown_table([{"setting": k, "value": v} for k, v in vars(self.config).items()],
                                  ["setting", "value"])  # fmt: skip
        rows = summary["families"]
        if not rows:
            return [("Settings", settings), ("Headline", "No SAE trained.")]
        h = summary["headline"]
        columns = ["family", "n_seeds", "d_sae", "n_parameters", "val_mse", "val_mse_sd", "val_explained_variance",
                   "val_l0", "val_dead_fraction", "win_rate", "win_rate_sd", "n_firings", "register_median_cosine",
                   "bundle_median_cosine"]  # fmt: skip
        ratios = ", ".join(f"{k.removesuffix('_mse_over_flat')} {v:.2f}x"
                           for k, v in h.items() if k.endswith("_mse_over_flat"))  # fmt: skip
        text = (f"Cell L{self.layer} H{self.head}, budget `{self.config.budget}`, {h['n_sae']} SAEs. Lowest validation "
                f"MSE: `{h.get('lowest_val_mse')}`; highest substitution win rate: `{h.get('highest_win_rate')}`. "
                f"Validation MSE over the flat family's: {ratios or 'n/a'}. Paper ({PAPER_REFERENCE['table']}, "
                f"{PAPER_REFERENCE['model']}; a different model, cited as reference): "
                f"{PAPER_REFERENCE['value']}.")  # fmt: skip
        table = markdown_table(rows, columns)
        return [("Settings", settings), ("Headline", text), ("Families (mean over seeds; sd)", table)]

    def plots(self, summary: dict[str, Any], records: list[FamilyRecord], plt: Any) -> dict[str, Any]:
        families = [r["family"] for r in summary["families"]]
        metrics = [("val_mse", "validation MSE"), ("win_rate", "substitution win rate"),
                   ("register_median_cosine", "register median cosine")]  # fmt: skip
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, (metric, label) in zip(axes[0], metrics):
            for x, family in enumerate(families):
                ys = [getattr(r, metric) for r in records if r.family == family and getattr(r, metric) is not None]
                ax.scatter([x] * len(ys), ys, s=16, alpha=0.7)
                if ys:
                    ax.plot([x - 0.25, x + 0.25], [np.mean(ys)] * 2, color="black", linewidth=1.5)
            ax.set_xticks(range(len(families)), families, rotation=30, ha="right", fontsize=8)
            ax.set_title(label, fontsize=9)
        axes[0][0].set_yscale("log")
        fig.tight_layout()
        return {"families.png": fig}


def run_families(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    store: Any = None,
    train_tokens: Int[Tensor, "train_batch train_pos"] | None = None,
    layer: int | None = None,
    head: int | None = None,
    kind: str = "state",
    config: FamiliesConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    device: str = "cpu",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> ProtocolResult[FamilyRecord]:
    """Train every SAE family at every seed on one cell; validation MSE and substitution win rate per family.

    Args:
        model: The hooked model.
        tokens: Held-out sequences (substitution test).
        store: A store holding the cell (`writesae collect`); or None with ``train_tokens``.
        train_tokens: Training sequences to collect a store from (``{out_dir}/store``, or a
            temporary folder) when no ``store`` is given; needs ``layer`` and ``head``.
        layer: The cell's layer (default with a store: its only cell).
        head: The cell's head.
        kind: What a collected store holds: ``"state"`` (the paper's input) or ``"write"``.
        config: `FamiliesConfig` (default: the paper's Table 7 setting).
        out_dir: The run directory (the trained cells go to ``{out_dir}/cells``); None: a temporary folder
            holds the cells, the records stay in memory.
        mode: ``"new"``, ``"resume"`` (finished SAEs are not trained again; a stopped one continues
            from its checkpoint) or ``"overwrite"``.
        verbose: Progress bar over the SAEs.
        device: Where the SAEs train.
        attention_mask: Padding mask of ``tokens``.

    Returns:
        One `FamilyRecord` per (family, seed); the summary's ``families`` averages the seeds.
    """
    from writesae.outputs import holds_files, prepare_output_dir
    from writesae.store import collect

    work = prepare_output_dir(out_dir, mode, what="families run") if out_dir is not None else None
    scratch = work if work is not None else Path(tempfile.mkdtemp(prefix="families-"))
    if store is None:
        if train_tokens is None or layer is None or head is None:
            raise ValueError("run_families needs store=, or train_tokens= with layer= and head= to collect one")
        folder = scratch / "store"
        store_mode = "resume" if mode == "resume" and holds_files(folder) else "new"
        store = collect(model, train_tokens, layers=[layer], heads=[head], kind=kind, out_dir=folder, skip_first=1,
                        verbose=False, mode=store_mode)  # fmt: skip
    protocol = Families(model, tokens, store, layer=layer, head=head, config=config, cells_dir=scratch / "cells",
                        device=device, attention_mask=attention_mask)  # fmt: skip
    # The folder is prepared above (and may hold the store): the protocol continues in it.
    inner = "new" if work is None else "resume" if holds_files(work) else "overwrite"
    return run_protocol(protocol, work, mode=inner, verbose=verbose)
