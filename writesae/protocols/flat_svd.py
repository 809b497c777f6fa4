"""WriteSAE atoms against a FlatSAE projected to rank 1 (paper Table 6, §6.3 / App. F.4).

A FlatSAE (``variant="flat"``: dense encoder, dense ``[d_k, d_v]`` atoms) cannot be written into
the cache as it is: its atoms are full-rank matrices. The paper's baseline takes a top-1 SVD to get
a rank-1 write and substitutes that, beside the WriteSAE atoms, at the same cell and tokens; both
win rates (atom beats deletion) sit side by side. The paper's answer: a tie on Gated DeltaNet
(91.25% vs 91.36%: gate decay already makes the state rank-1 dominated), +6.55pp for WriteSAE on
Mamba-2. The other dense-decoder family, ``variant="bilinear_flat"`` (matched-filter encoder, dense
atoms; paper Table 7), goes through the same projection: "flat SAE" below means either.

What is projected (``FlatSVDConfig.svd_of``, docs/design.md §5):

- ``"reconstruction"`` (App. F.4 as written, the default): encode the state, decode it with the
  flat atoms, and substitute the top singular pair ``u_1 v_1^T`` of that reconstruction (at the
  native write's Frobenius norm in the paper's matched-norm setting; times the firing's code at the
  activation scale). The pair depends on the position, not on the atom.
- ``"atom"``: each flat atom replaced by its own top singular pair ``sigma_1 u_1 v_1^T``, which is
  then substituted exactly like a WriteSAE atom (`rank1_projection`).

The FlatSAE's codes are unchanged either way (its encoder is kept), so its firings are its own. Both
SAEs run through the same `SubstitutionTest` with the same `SubstitutionConfig`; the paper's Table 6
setting is the matched-norm scale, capped at 3 firings per atom (the config's defaults here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .activity import Firing
from .checks import check_config
from .report import config_table, markdown_table
from .run import ProtocolResult, run_protocol
from .substitution import SubstitutionConfig, SubstitutionTest
from .substitution_set import SubstitutionSet, TaggedRecord

__all__ = ["PAPER_REFERENCE", "FlatSVDConfig", "FlatSVDTest", "flat_svd_test", "rank1_projection", "run_flat_svd"]

PAPER_REFERENCE: dict[str, str] = {
    "table": "Table 6",
    "model": "Qwen3.5-0.8B L9 H4 (Gated DeltaNet); Mamba-2-370M L24 H0",
    "value": "WriteSAE vs FlatSAE+SVD: GDN 91.25% vs 91.36% (-0.11pp, n=1,851); "
    "Mamba-2 82.85% vs 76.30% (+6.55pp, n=2,367)",
}

WRITESAE, FLAT_SVD = "writesae", "flat_svd"


def _table6_substitution() -> SubstitutionConfig:
    return SubstitutionConfig(scale="matched_norm", max_firings_per_atom=3)


@dataclass
class FlatSVDConfig:
    """Choices of the flat+SVD comparison (defaults: the paper's Table 6; docs/design.md §5).

    Attributes:
        substitution: The substitution test both SAEs run (paper: matched Frobenius norm, 3 firings
            per atom; its other fields keep the substitution test's defaults).
        svd_of: ``"reconstruction"``: the top singular pair of the flat SAE's reconstruction at the
            firing (App. F.4); ``"atom"``: each flat atom's own top singular pair.
    """

    substitution: SubstitutionConfig = field(default_factory=_table6_substitution)
    svd_of: Literal["reconstruction", "atom"] = "reconstruction"

    def __post_init__(self) -> None:
        check_config(self)


# What a dense-decoder family becomes once its atoms are rank-1: the same encoder, a factor decoder.
_PROJECTED = {"flat": "matrix", "bilinear_flat": "bilinear"}


def _check_dense_decoder(flat_sae: Any, what: str) -> str:
    """The SAE's variant, if it has a dense decoder (``"flat"``, ``"bilinear_flat"``); else a clear error."""
    variant = flat_sae.cfg.variant
    if variant not in _PROJECTED:
        raise ValueError(f"{what} a dense-decoder SAE, variant 'flat' or 'bilinear_flat' (got {variant!r}); train "
                         "one with `writesae train --variant flat`")  # fmt: skip
    return variant


@torch.no_grad()
def rank1_projection(flat_sae: Any) -> Any:
    """A FlatSAE with every atom replaced by its top singular pair ``sigma_1 u_1 v_1^T``.

    The result keeps the flat SAE's encoder, biases and buffers, so it gives the same codes: a
    ``variant="matrix"`` WriteSAE (dense encoder, rank-1 atoms) for ``"flat"``, a ``"bilinear"`` one
    (the same matched filters) for ``"bilinear_flat"``. Atom ``i``'s key factor is ``sigma_1 u_1`` and its
    value factor ``v_1`` (norm ``sigma_1``, the projection's Frobenius norm). A rank-r bilinear_flat
    encoder keeps its rank, so the projected decoder has r factor rows per atom: the top pair, then zeros
    (the atom stays the rank-1 ``sigma_1 u_1 v_1^T``).

    Raises:
        ValueError: the SAE has no dense decoder.
    """
    from writesae.config import WriteSAEConfig
    from writesae.sae import WriteSAE

    variant = _check_dense_decoder(flat_sae, "rank1_projection needs")
    cfg = WriteSAEConfig.from_dict({**flat_sae.cfg.to_dict(), "variant": _PROJECTED[variant]})
    projected = WriteSAE(cfg)
    atoms = flat_sae.atom_matrices().double()  # [d_sae, d_k, d_v]
    u, s, vh = torch.linalg.svd(atoms, full_matrices=False)
    dtype, rank = flat_sae.W_dec.dtype, cfg.rank
    state = {name: value for name, value in flat_sae.state_dict().items() if name != "W_dec"}
    key = torch.zeros(cfg.d_sae, rank, cfg.d_k, dtype=dtype)
    value = torch.zeros(cfg.d_sae, rank, cfg.d_v, dtype=dtype)
    key[:, 0] = (s[:, :1] * u[:, :, 0]).to(dtype)
    value[:, 0] = vh[:, 0, :].to(dtype)
    state["W_dec_key"], state["W_dec_value"] = key.to(flat_sae.device), value.to(flat_sae.device)
    projected.load_state_dict(state)
    return projected.to(flat_sae.device)


class _ReconstructionSVD(SubstitutionTest):
    """The substitution test of a flat SAE whose substitute is the top singular pair of its
    reconstruction at the position (codes, firings and random controls from `rank1_projection`)."""

    def __init__(self, model: Any, flat_sae: Any, tokens: Tensor, **options: Any) -> None:
        super().__init__(model, rank1_projection(flat_sae), tokens, **options)
        self.flat_sae = flat_sae

    @torch.no_grad()
    def _substitute(self, firing: Firing, atom: int) -> tuple[Float[Tensor, "d_k d_v"], float]:
        active, codes = self.activity.codes_at(firing.sequence, firing.position)
        flat = self.flat_sae
        offset = flat.b_dec + (flat.input_mean if flat.cfg.input_mean == "fixed" else 0.0)
        matrices = flat.atom_matrices(active.to(flat.device))  # [k, d_k, d_v]
        recon = (codes.to(matrices)[:, None, None] * matrices).sum(0) + offset
        u, _, vh = torch.linalg.svd(recon.double().cpu(), full_matrices=False)
        return torch.outer(u[:, 0], vh[0]).float(), 1.0  # unit norm: the scale alone sets its size


def flat_svd_test(model: Any, flat_sae: Any, tokens: Tensor, svd_of: str, **options: Any) -> SubstitutionTest:
    """The substitution test of a flat SAE through its top-1 SVD (``svd_of``: see `FlatSVDConfig`).

    Args:
        model: The hooked model.
        flat_sae: A ``variant="flat"`` or ``"bilinear_flat"`` SAE.
        tokens: Held-out sequences.
        svd_of: ``"reconstruction"`` or ``"atom"``.
        **options: `SubstitutionTest`'s keyword arguments (``config``, ``attention_mask``...).
    """
    if svd_of == "atom":
        return SubstitutionTest(model, rank1_projection(flat_sae), tokens, **options)
    if svd_of == "reconstruction":
        return _ReconstructionSVD(model, flat_sae, tokens, **options)
    raise ValueError(f"svd_of must be 'reconstruction' or 'atom' (got {svd_of!r})")


class FlatSVDTest(SubstitutionSet):
    """WriteSAE atoms and flat+SVD substitutes, one substitution test each (`run_flat_svd`).

    Args:
        model: The hooked model.
        sae: The WriteSAE of the cell (any variant with factor atoms).
        tokens: Held-out sequences.
        flat_sae: A ``variant="flat"`` (or ``"bilinear_flat"``) SAE of the same cell and input (state or write).
        config: The comparison's choices.
        attention_mask: Padding mask of ``tokens``.
    """

    name, title = "flat-svd", "WriteSAE atoms vs FlatSAE + top-1 SVD (Table 6)"

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Int[Tensor, "batch pos"],
        *,
        flat_sae: Any,
        config: FlatSVDConfig | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> None:
        self.config = config = config or FlatSVDConfig()
        _check_dense_decoder(flat_sae, "flat_sae must be")
        if sae.cfg.metadata.hook_name != flat_sae.cfg.metadata.hook_name or (
            sae.cfg.metadata.hook_head_index != flat_sae.cfg.metadata.hook_head_index
        ):
            raise ValueError(
                f"the WriteSAE ({sae.cfg.metadata.hook_name} head {sae.cfg.metadata.hook_head_index}) and the flat "
                f"SAE ({flat_sae.cfg.metadata.hook_name} head {flat_sae.cfg.metadata.hook_head_index}) must read "
                "the same cell"
            )
        options = {"config": config.substitution, "attention_mask": attention_mask}
        flat_test = flat_svd_test(model, flat_sae, tokens, config.svd_of, **options)
        super().__init__({WRITESAE: SubstitutionTest(model, sae, tokens, **options), FLAT_SVD: flat_test})

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "svd_of": self.config.svd_of}

    def summarize(self, records: list[TaggedRecord]) -> dict[str, Any]:
        summaries = self.summaries(records)
        variant = self.config.substitution.headline
        rates = {name: s.get("headline", {}).get("win_rate") for name, s in summaries.items()}
        headline: dict[str, Any] = {
            "variant": variant,
            "svd_of": self.config.svd_of,
            "writesae_win_rate": rates[WRITESAE],
            "flat_svd_win_rate": rates[FLAT_SVD],
            "delta_pp": None if None in rates.values() else 100 * (rates[WRITESAE] - rates[FLAT_SVD]),
            "writesae_n": summaries[WRITESAE]["n_firings"],
            "flat_svd_n": summaries[FLAT_SVD]["n_firings"],
            "writesae_register_median_cosine": summaries[WRITESAE]["partition"]["register_median_cosine"],
        }
        variants = []
        for v in self.config.substitution.measured:
            row: dict[str, Any] = {"variant": v}
            for name, s in summaries.items():
                alt = next((a for a in s.get("alternatives", []) if a["variant"] == v), None)
                row[f"{name}_n"] = alt["n"] if alt else 0
                row[f"{name}_win_rate"] = alt["win_rate"] if alt else None
                row[f"{name}_wilson95"] = alt["wilson95"] if alt else None
            variants.append(row)
        return {"headline": headline, "variants": variants, WRITESAE: summaries[WRITESAE],
                FLAT_SVD: summaries[FLAT_SVD], "paper_reference": PAPER_REFERENCE}  # fmt: skip

    def tables(self, summary: dict[str, Any], records: list[TaggedRecord]) -> dict[str, list[Any]]:
        split = self.by_test(records)
        return {f"atoms_{name}": test.tables(summary[name], split[name])["atoms"] for name, test in self.tests.items()}

    def report(self, summary: dict[str, Any], records: list[TaggedRecord]) -> list[tuple[str, str]]:
        h = summary["headline"]
        sections = [("Settings", config_table(self.config.substitution) + f"\n\nSVD of: `{self.config.svd_of}`")]
        if h["writesae_win_rate"] is None or h["flat_svd_win_rate"] is None:
            return sections + [("Headline", f"No firings: WriteSAE {h['writesae_n']}, flat+SVD {h['flat_svd_n']}.")]
        sections.append((
            "Headline",
            f"In the paper's setting (`{h['variant']}`), WriteSAE atoms beat deletion on "
            f"**{h['writesae_win_rate']:.1%}** of {h['writesae_n']} firings and the flat SAE's top-1 SVD "
            f"({h['svd_of']}) on **{h['flat_svd_win_rate']:.1%}** of {h['flat_svd_n']}: {h['delta_pp']:+.2f}pp. "
            f"Paper ({PAPER_REFERENCE['table']}, {PAPER_REFERENCE['model']}; "
            f"a different model, cited as reference): {PAPER_REFERENCE['value']}.",
        ))  # fmt: skip
        rows = [{"variant": r["variant"], **{f"{n} win rate": _pct(r[f"{n}_win_rate"]) for n in (WRITESAE, FLAT_SVD)},
                 **{f"{n} n": r[f"{n}_n"] for n in (WRITESAE, FLAT_SVD)}} for r in summary["variants"]]  # fmt: skip
        columns = ["variant", f"{WRITESAE} win rate", f"{FLAT_SVD} win rate", f"{WRITESAE} n", f"{FLAT_SVD} n"]
        sections.append(("Every variant, side by side", markdown_table(rows, columns)))
        return sections

    def plots(self, summary: dict[str, Any], records: list[TaggedRecord], plt: Any) -> dict[str, Any]:
        rows = summary["variants"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(rows))
        for offset, name, color in ((-0.2, WRITESAE, "tab:blue"), (0.2, FLAT_SVD, "tab:gray")):
            rates = np.array([np.nan if r[f"{name}_win_rate"] is None else r[f"{name}_win_rate"] for r in rows])
            bounds = [r[f"{name}_wilson95"] or (rate, rate) for r, rate in zip(rows, rates)]
            low, high = [rate - b[0] for rate, b in zip(rates, bounds)], [b[1] - rate for rate, b in zip(rates, bounds)]
            ax.bar(x + offset, rates, width=0.4, color=color, label=name, yerr=[low, high], capsize=3)
        ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
        ax.set_xticks(x, [r["variant"] for r in rows], fontsize=8, rotation=15)
        ax.set_ylabel("win rate (atom beats deletion)")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("WriteSAE vs FlatSAE + top-1 SVD (Wilson 95%)")
        return {"win_rates.png": fig}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def run_flat_svd(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    flat_sae: Any,
    config: FlatSVDConfig | None = None,
    out_dir: str | Path | None = None,
    mode: str = "new",
    verbose: bool = True,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> ProtocolResult[TaggedRecord]:
    """Substitute WriteSAE atoms and a flat SAE's top-1 SVD at their firings; win rates side by side.

    Args:
        model: The hooked model.
        sae: The cell's WriteSAE.
        tokens: Held-out sequences.
        flat_sae: A ``variant="flat"`` (or ``"bilinear_flat"``) SAE of the same cell (`writesae train --variant flat`).
        config: `FlatSVDConfig` (default: the paper's Table 6 setting).
        out_dir: The run directory; None keeps everything in memory.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"``.
        verbose: Progress bar.
        attention_mask: Padding mask of ``tokens``.

    Returns:
        Records tagged ``"writesae"`` or ``"flat_svd"``; the summary's ``headline`` holds both win rates.
    """
    test = FlatSVDTest(model, sae, tokens, flat_sae=flat_sae, config=config, attention_mask=attention_mask)
    return run_protocol(test, out_dir, mode=mode, verbose=verbose)

