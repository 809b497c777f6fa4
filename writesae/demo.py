"""``writesae demo``: the whole pipeline, offline, on a shipped model, with the headline figures.

1. Pick the (layer, head) with the longest memory (slowest decay); capture its per-position states
   and its writes on training-split stdlib text.
2. Train two WriteSAEs (bilinear encoder, rank-1 atoms, TopK): one on the states (the paper's
   setting), one on the writes (an alternative), on the data scaled to unit mean square
   (``input_scaling="unit_mean_square"``: these small models' states and writes are far below unit
   scale, where raw training leaves most atoms dead; the saved SAEs act on raw data).
3. Splice the state SAE back with the error term (logits unchanged).
4. The paper's protocols on held-out text, each in its own run directory (docs/design.md §7.2):
   the substitution test of both SAEs, every variant measured on every firing; the logit shift of
   the state SAE's atoms along the ladder from the paper's formula to the exact first-order shift,
   on a grid of small eps and on the paper's absolute grid (where first order ends); installs during
   generation in the paper's setting, and with the alternatives beside it.

The headline is always the paper's setting (docs/design.md §5) with the alternatives beside it;
``report.md`` lists every setting that differs from the paper, and why. Sizes are chosen to finish
in a few minutes per model on one CPU thread; they are far smaller than the paper's, so the
figures illustrate the protocols on a 1.4M-parameter model rather than reproduce the paper.

``mode`` follows `writesae.outputs.prepare_output_dir`; ``"resume"`` continues an interrupted demo
stage by stage (stores and training from their checkpoints, protocols from their record logs) and
ends with the figures of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from hooked_recurrent.files import atomic_write_text
from writesae.outputs import OutputMode, holds_files, prepare_output_dir

__all__ = ["run_demo", "DEMO_SIZES", "demo_trainer", "longest_memory_cell"]

DEMO_SIZES = dict(
    store_sequences=256, seq_len=128, d_sae=512, k=8, epochs=20,
    substitution_sequences=32, substitution_atoms=48, firings_per_atom=8,
    shift_prompts=12, shift_atoms=8, shift_positions=2, install_prompts=8, install_length=64, new_tokens=20,
)  # fmt: skip

SMALL_EPS = (0.01, 0.03, 0.1, 0.3)
"""The demo's logit-shift grid, in units of the median state norm (first order holds there)."""

INSTALL_MULTIPLES = (0.03, 0.1, 0.3, 1.5, 3.0, 6.0)
"""The paper's 1.5, 3 and 6, with smaller multiples before them to show where the effect saturates."""

INSTALL_CLASSES = (("midrank", 100, 1000), ("rare", 1000, None))

PAPER_REFERENCE = {
    "Qwen3_5ForCausalLM": {
        "substitution": "The paper reports 92.4% on Qwen3.5-0.8B L9 H4.",
        "install": "The paper reports, on Qwen3.5-0.8B L9 H4, rank improved in 77.4% of pooled trials and a median "
                   "first-step lift of +1.27 nats.",
    },
    "Mamba2ForCausalLM": {
        "substitution": "The paper reports 88.1% on Mamba-2-370M L24 H0 (its section 6.2).",
        "install": "The paper reports this install as a failure on Mamba-2-370M L24 H0: median first-step lift about 0 "
                   "over 3,600 trials (its section 5.5).",
    },
}  # fmt: skip
"""The paper's figures quoted beside the demo's, per host (its other hosts get the Qwen3.5 ones)."""
"""The paper's midrank class; its rare class starts at rank 10,000, beyond a 4,096-token vocabulary."""


def _log(message: str, start: float) -> None:
    print(f"[{time.time() - start:6.1f} s] {message}", flush=True)


def _stage_mode(path: Path, mode: OutputMode) -> OutputMode:
    """A stage folder continues when the demo resumes and the stage had started; else it is new."""
    return "resume" if mode == "resume" and holds_files(path) else "new"


def run_demo(
    model_name: str = "stdlib:qwen3.5",
    out_dir: str | Path = "runs/demo",
    layer: int | None = None,
    head: int | None = None,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    threads: int | None = 1,
    mode: OutputMode = "new",
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the pipeline and return (and print) the headline figures.

    Args:
        model_name: A shipped model (``stdlib:qwen3.5``, ``stdlib:mamba2``) or any model name.
        out_dir: Where everything goes (``summary.json``, ``report.md``, one folder per stage).
        layer: The cell's layer (default: with ``head``, the head with the longest memory).
        head: The cell's head.
        seed: Seed of the data draws and the training.
        sizes: Overrides of `DEMO_SIZES`.
        threads: Torch threads; 1 by default (the models are small, and on a shared machine extra
            OpenMP threads mostly wait for each other); None keeps torch's setting.
        mode: ``"new"``, ``"resume"`` or ``"overwrite"`` (see the module docstring).
        device: Where the model, the tokens and the SAEs go (``"cuda"`` on a GPU).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    from hooked_recurrent import HookedRecurrentModel
    from writesae.tokens import token_blocks

    sizes = {**DEMO_SIZES, **(sizes or {})}
    start = time.time()
    out = prepare_output_dir(out_dir, mode, what="demo run")
    torch.manual_seed(seed)
    model = HookedRecurrentModel.from_pretrained(model_name, device=device)
    cfg = model.cfg
    if layer is None or head is None:
        probe = token_blocks(model, "stdlib", split="train", n_sequences=4, seq_len=sizes["seq_len"], seed=seed + 1).to(device)
        layer, head, decay = longest_memory_cell(model, probe, layer)
        _log(f"cell with the longest memory: L{layer} H{head} (median decay per token {decay:.3f})", start)
    _log(f"{model_name}: {cfg.architecture}, layers {cfg.layer_types}; cell L{layer} H{head}, state {cfg.d_k}x{cfg.d_v}", start)

    train_tokens = token_blocks(model, "stdlib", split="train", n_sequences=sizes["store_sequences"], seq_len=sizes["seq_len"],
                                seed=seed).to(device)  # fmt: skip
    saes, sae_metrics = {}, {}
    for kind in ("state", "write"):
        saes[kind], sae_metrics[kind] = _train_sae(model, train_tokens, layer, head, kind, out, sizes, seed, mode, device)
        m = sae_metrics[kind]
        _log(f"WriteSAE on {kind}s (d_sae={sizes['d_sae']}, k={sizes['k']}): val explained variance "
             f"{m['val_explained_variance']:.3f}, dead {m['val_dead_fraction']:.1%}", start)  # fmt: skip

    held_out = token_blocks(model, "stdlib", split="val", n_sequences=sizes["substitution_sequences"], seq_len=sizes["seq_len"],
                            seed=seed).to(device)  # fmt: skip
    with torch.no_grad():
        exact = bool(torch.equal(model(held_out[:2]), model.run_with_saes(held_out[:2], saes=[saes["state"]], use_error_term=True)))
    _log(f"state SAE spliced with the error term: logits unchanged = {exact}", start)

    figures = {
        "model": model_name,
        "architecture": cfg.architecture,
        "cell": {"layer": layer, "head": head},
        "sae": {kind: {"d_sae": sizes["d_sae"], "k": sizes["k"], **m} for kind, m in sae_metrics.items()},
        "splice_with_error_term_exact": exact,
        "substitution": _substitution(model, saes, held_out, out, sizes, mode, start),
        "logit_shift": _logit_shift(model, saes["state"], held_out[: sizes["shift_prompts"]], out, sizes, mode, start),
        "install": _install(model, held_out[: sizes["install_prompts"], : sizes["install_length"]], layer, head, sizes["new_tokens"],
                            out, mode, start),
    }
    figures["seconds"] = round(time.time() - start, 1)
    atomic_write_text(out / "summary.json", json.dumps(figures, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", demo_report(figures, sizes))
    _log(f"all results under {out}/ (report.md, summary.json, one folder per stage)", start)
    return figures


def _train_sae(model: Any, tokens: torch.Tensor, layer: int, head: int, kind: str, out: Path, sizes: dict[str, int], seed: int,
               mode: OutputMode, device: str) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Capture the cell's states or writes and train a WriteSAE on them (resumable stage by stage)."""
    from writesae.store import collect
    from writesae.training import train_on_store

    store = collect(model, tokens, layers=[layer], heads=[head], kind=kind, out_dir=out / f"store_{kind}", skip_first=1,
                    verbose=False, mode=_stage_mode(out / f"store_{kind}", mode))  # fmt: skip
    training = out / f"training_{kind}"
    trainer = demo_trainer(sizes, training)
    resume_from = training / "checkpoint"
    if not resume_from.is_dir():  # nothing to continue (a new run, or one stopped before its first checkpoint)
        shutil.rmtree(training, ignore_errors=True)
        resume_from = None
    sae, metrics = train_on_store(store, layer, head, d_sae=sizes["d_sae"], k=sizes["k"], trainer=trainer, seed=seed,
                                  resume_from=resume_from, device=device)  # fmt: skip
    sae.save_model(out / f"sae_{kind}")
    return sae, metrics


def _substitution(model: Any, saes: dict[str, Any], tokens: torch.Tensor, out: Path, sizes: dict[str, int], mode: OutputMode,
                  start: float) -> dict[str, Any]:  # fmt: skip
    """Both SAEs, every variant; the state SAE's headline variant is the paper's setting."""
    from writesae.protocols.substitution import SubstitutionConfig, run_substitution

    config = SubstitutionConfig(n_atoms=sizes["substitution_atoms"], max_firings_per_atom=sizes["firings_per_atom"], n_bootstrap=1000)
    runs = {}
    for kind, folder in (("state", "substitution"), ("write", "substitution_write_sae")):
        runs[kind] = run_substitution(model, saes[kind], tokens, config=config, out_dir=out / folder,
                                      mode=_stage_mode(out / folder, mode), verbose=False).summary  # fmt: skip
    s = runs["state"]
    h = s["headline"]
    _log(f"substitution (paper setting: state SAE, {s['headline_variant']}, non-firing atom control): atom beats deletion on "
         f"{h['win_rate']:.1%} of {h['n']} firings at {s['n_positions']} positions (Wilson 95% [{h['wilson95'][0]:.1%}, "
         f"{h['wilson95'][1]:.1%}], by passage [{h['passage_bootstrap95'][0]:.1%}, {h['passage_bootstrap95'][1]:.1%}])", start)  # fmt: skip
    grid = [{"sae_input": kind, **{k: a[k] for k in ("variant", "n", "win_rate", "wilson95", "strict_chain_rate")}}
            for kind, summary in runs.items() for a in summary.get("alternatives", [])]  # fmt: skip
    _log("  alternatives: " + ", ".join(f"{g['sae_input']} {g['variant']} {g['win_rate']:.0%}" for g in grid), start)
    p = s["partition"]
    _log(f"  partition of all {p['n_alive']} alive atoms: {p['n_registers']} registers / {p['n_bundles']} bundles "
         f"(delta BIC {p['delta_bic']:.1f})", start)  # fmt: skip
    headline = {k: h[k] for k in ("variant", "n", "win_rate", "wilson95", "atom_bootstrap95", "passage_bootstrap95",
                                  "permutation_p", "strict_chain_rate", "wilcoxon_p", "cliffs_delta", "median_kl")}  # fmt: skip
    return {"headline": {**headline, "n_positions": s["n_positions"], "n_sequences": s["n_sequences"]}, "alternatives": grid,
            "population": s["population"], "partition": p, "partition_write_sae": runs["write"]["partition"]}  # fmt: skip


def _logit_shift(model: Any, sae: Any, prompts: torch.Tensor, out: Path, sizes: dict[str, int], mode: OutputMode,
                 start: float) -> dict[str, Any]:  # fmt: skip
    """Every path on a grid of small eps; the exact path on the paper's absolute grid too."""
    from writesae.protocols.logit_shift import LogitShiftConfig, run_logit_shift

    runs = {}
    for name, folder, config in (
        ("small_eps", "logit_shift", LogitShiftConfig(epsilons=SMALL_EPS, eps_scale="state_norm", n_atoms=sizes["shift_atoms"], positions_per_prompt=sizes["shift_positions"])),
        ("paper_eps", "logit_shift_paper_eps", LogitShiftConfig(n_atoms=sizes["shift_atoms"], positions_per_prompt=sizes["shift_positions"])),
    ):  # fmt: skip
        runs[name] = run_logit_shift(model, sae, prompts, config=config, out_dir=out / folder,
                                     mode=_stage_mode(out / folder, mode), verbose=False).summary  # fmt: skip
    small, paper = runs["small_eps"], runs["paper_eps"]
    _log(f"logit shift, median zero-parameter R^2 (eps {SMALL_EPS} x state norm {small['eps_unit']:.3g}): exact "
         f"{small['median_r2']['exact']:.3f}, paper formula {small['median_r2']['out_proj']:.3f}; ladder "
         + ", ".join(f"{k} {v:.3f}" for k, v in small["median_r2"].items() if v is not None), start)  # fmt: skip
    _log("  on the paper's absolute eps grid: exact R^2 " + ", ".join(
        f"eps {row['eps']:g}: {row['median_r2_exact']:.3f}" for row in paper["linearity"]), start)  # fmt: skip
    keep = ("eps_unit", "median_r2", "median_r2_triple_fit", "ladder", "linearity", "n_cells", "n_records")
    return {name: {k: summary[k] for k in keep} for name, summary in runs.items()}


def _install(model: Any, prompts: torch.Tensor, layer: int, head: int, new_tokens: int, out: Path, mode: OutputMode,
             start: float) -> dict[str, Any]:  # fmt: skip
    """The paper's setting (the key is the reading query; the paper is silent), and the alternatives."""
    from writesae.protocols.install import InstallConfig, run_install

    base = dict(multiples=INSTALL_MULTIPLES, ends_from_last=(0, 2), rank_classes=INSTALL_CLASSES, new_tokens=new_tokens)
    settings = {
        "paper": ("install", InstallConfig(**base)),
        "native_key": ("install_native_key", InstallConfig(**base, key="native")),
        "readout": ("install_readout", InstallConfig(**base, direction="readout")),
        "logprob_gradient": ("install_logprob_gradient", InstallConfig(**base, direction="logprob_gradient")),
    }
    figures = {}
    for name, (folder, config) in settings.items():
        summary = run_install(model, prompts, layer, head, config=config, out_dir=out / folder,
                              mode=_stage_mode(out / folder, mode), verbose=False).summary  # fmt: skip
        top = summary["largest_multiple"]
        figures[name] = {"key": config.key, "direction": config.direction, "norm": config.norm,
                         "median_key_query_cosine": summary["median_key_query_cosine"], "largest_multiple": top,
                         "saturation": summary["saturation"]}  # fmt: skip
        _log(f"installs ({name}: key {config.key}, direction {config.direction}): at m = {top['multiple']:g}, rank improved "
             f"{top['rank_improved']:.0%} of {top['n']}, median first-step lift {top['median_logp_lift']:+.2f} nats", start)  # fmt: skip
    return figures


def demo_trainer(sizes: dict[str, int], out_dir: Path) -> Any:
    """The demo's training recipe (`TrainerConfig`) for small models: lr 2e-3, batch 128, 20 warm-up steps,
    data scaled to unit mean square, ``sizes["epochs"]`` epochs; checkpoints and logs in ``out_dir``."""
    from writesae.trainer import TrainerConfig

    return TrainerConfig(epochs=sizes["epochs"], batch_size=128, lr=2e-3, warmup_steps=20, progress=False, out_dir=out_dir,
                         input_scaling="unit_mean_square")  # fmt: skip


@torch.no_grad()
def longest_memory_cell(model: Any, tokens: torch.Tensor, layer: int | None = None) -> tuple[int, int, float]:
    """The (layer, head) whose state decays slowest (median alpha_t); heads that forget every token
    in one step have states equal to their last write, which leaves nothing for the protocols."""
    layers = model.cfg.recurrent_layers if layer is None else [layer]
    _, cache = model.run_with_cache(tokens, names_filter=[model.cfg.hook_name(l, "hook_log_decay") for l in layers])
    best = (layers[0], 0, -1.0)
    for l in layers:
        decay = cache[model.cfg.hook_name(l, "hook_log_decay")].exp().flatten(0, 1).median(0).values
        h = int(decay.argmax())
        if float(decay[h]) > best[2]:
            best = (l, h, float(decay[h]))
    return best


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def demo_report(figures: dict[str, Any], sizes: dict[str, int]) -> str:
    """``report.md``: the headline in the paper's settings, the alternatives, and every difference."""
    s, ls, ins = figures["substitution"], figures["logit_shift"], figures["install"]
    h, p = s["headline"], s["partition"]
    small, paper = ls["small_eps"], ls["paper_eps"]
    cell = figures["cell"]
    reference = PAPER_REFERENCE.get(figures.get("architecture", ""), PAPER_REFERENCE["Qwen3_5ForCausalLM"])
    lines = [
        f"# WriteSAE demo: {figures['model']}, layer {cell['layer']} head {cell['head']}",
        "",
        "## Headline, in the paper's settings",
        "",
        f"- **Substitution** (SAE on states, the firing atom scaled by its activation, a non-firing atom as random "
        f"control): the atom beats deletion on **{_pct(h['win_rate'])}** of {h['n']} firings at {h['n_positions']} "
        f"positions in {h['n_sequences']} sequences (Wilson 95% [{_pct(h['wilson95'][0])}, {_pct(h['wilson95'][1])}], "
        f"clustered by passage [{_pct(h['passage_bootstrap95'][0])}, {_pct(h['passage_bootstrap95'][1])}], passage-level "
        f"sign-flip p = {h['permutation_p']:.3g}); strict chain {_pct(h['strict_chain_rate'])}. {reference['substitution']}",
        f"- **Register / bundle partition** of all {p['n_alive']} alive atoms ({p['n_dead']} dead) on "
        f"{p['scanned_positions']} held-out positions: {p['n_registers']} registers, {p['n_bundles']} bundles "
        f"(two-component mixture, delta BIC {p['delta_bic']:.1f}); {p['n_above_0.05']} atoms have median cosine >= 0.05.",
        f"- **Logit shift**, median zero-parameter R^2 over (atom, eps) cells: the paper's formula (Eq. 4) "
        f"**{small['median_r2']['out_proj']:.3f}**; the exact first-order shift **{small['median_r2']['exact']:.3f}** "
        f"(eps {', '.join(f'{e:g}' for e in SMALL_EPS)} x the median state norm {small['eps_unit']:.3g}).",
        f"- **Installs** (key: the reading query; direction: the paper's `W_O^T W_U[T]`; norm without the write's "
        f"strength): at m = {ins['paper']['largest_multiple']['multiple']:g} the target's rank improves in "
        f"**{_pct(ins['paper']['largest_multiple']['rank_improved'])}** of trials, median first-step lift "
        f"**{ins['paper']['largest_multiple']['median_logp_lift']:+.2f} nats**. {reference['install']} The same "
        f"direction pulled back through the head's gated norm too (`readout`, which the paper's formula leaves out): "
        f"{_pct(ins['readout']['largest_multiple']['rank_improved'])}, "
        f"{ins['readout']['largest_multiple']['median_logp_lift']:+.2f} nats.",
        "",
        "## Alternatives beside the headline",
        "",
        "Substitution, every (SAE input, atom, scale) cell measured on the same firings:",
        "",
        "| SAE input | variant | firings | atom beats deletion | Wilson 95% | strict chain |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {g['sae_input']} | {g['variant']} | {g['n']} | {_pct(g['win_rate'])} | [{_pct(g['wilson95'][0])}, "
              f"{_pct(g['wilson95'][1])}] | {_pct(g['strict_chain_rate'])} |" for g in s["alternatives"]]  # fmt: skip
    lines += ["", "Logit shift, the ladder from the paper's formula to the exact first-order shift (median R^2):", "",
              "| path | what it keeps | zero parameters | one scalar per cell |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['path']} | {r['label']} | {_num(r['median_r2'])} | {_num(r['median_r2_cell_scale'])} |" for r in small["ladder"]]
    lines += ["", "Where first order ends: the exact path's median R^2 per eps, and the paper's per-triple fit of G "
              "(one scalar per prompt, atom and eval token across eps), which measures linearity in eps, not the formula:", "",
              "| grid | eps | exact path | per-triple fit |", "|---|---|---|---|"]  # fmt: skip
    for name, run, unit in (("small (x state norm)", small, f" x {small['eps_unit']:.3g}"), ("paper (absolute)", paper, "")):
        lines += [f"| {name} | {row['eps']:g}{unit} | {_num(row['median_r2_exact'])} | {_num(row['median_r2_triple_fit'])} |"
                  for row in run["linearity"]]  # fmt: skip
    lines += ["", "Installs, the sweep over m (pooled over target classes):", "",
              "| setting | key-query cosine | m | rank improved | median first-step lift (nats) | target in continuation | unedited |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, run in ins.items():
        for row in run["saturation"]:
            lines.append(f"| {name} | {run['median_key_query_cosine']:.2f} | {row['multiple']:g} | {_pct(row['rank_improved'])} | "
                         f"{row['median_logp_lift']:+.2f} | {_pct(row['in_continuation'])} | {_pct(row['in_base_continuation'])} |")  # fmt: skip
    lines += ["", "## Settings that differ from the paper, and why", ""]
    lines += [f"- {item}" for item in _differences(figures, sizes)]
    lines += ["", "Every protocol's own run directory (settings, records, summary, report, plots, per-atom table) is "
              "beside this file; docs/design.md §5 lists every ambiguous choice with its parameter.", ""]  # fmt: skip
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _differences(figures: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    small = figures["logit_shift"]["small_eps"]
    return [
        f"Model and data: {figures['model']} (about 1.4M parameters, trained here on the Python standard library, "
        "4,096-token vocabulary) instead of Qwen3.5-0.8B on OpenWebText, so that the demo runs offline on a CPU.",
        "Cell: the head with the slowest decay instead of L9 H4 (heads that forget in one step leave nothing to test).",
        f"SAEs: {sizes['d_sae']} atoms, k = {sizes['k']}, {sizes['epochs']} epochs over {sizes['store_sequences']} x "
        f"{sizes['seq_len']} positions, lr 2e-3, inputs scaled to unit mean square (folded back into the biases) instead "
        "of 2,048 atoms, k = 32, 5M states and lr 3e-4 on raw data: a small model's states are far below unit scale, "
        "where the paper's raw recipe leaves most atoms dead.",
        "An SAE on writes is trained beside the paper's SAE on states, only to show the alternative in the table above.",
        f"Substitution: the {sizes['substitution_atoms']} most frequent atoms, at most {sizes['firings_per_atom']} firings "
        f"each, on {sizes['substitution_sequences']} held-out sequences of {sizes['seq_len']} tokens (paper: pools of 9-155 "
        "atoms, up to 30 firings each, hundreds of passages); the register/bundle partition uses those sequences as the "
        "validation split.",
        f"Logit shift: {sizes['shift_atoms']} atoms on {sizes['shift_prompts']} prompts, {sizes['shift_positions']} reference "
        "positions each, "
        f"horizons 1, 2, 4, 8 (paper: 50 atoms, 500 prompts, horizons unspecified). The headline grid is eps = "
        f"{', '.join(f'{e:g}' for e in SMALL_EPS)} x the median state norm ({small['eps_unit']:.3g}), where first order "
        "holds; the paper's absolute grid (0.1, 0.3, 1, 3, for unit atoms) is run too and shown above.",
        f"Installs: {sizes['install_prompts']} prompts of {sizes['install_length']} tokens, windows ending at the last and "
        "the third-to-last token, 2 targets per class (paper: 30 prompts, 5 positions, 8 targets). Classes: the paper's "
        "midrank (initial rank 100-1000), and 'rare' from rank 1,000 (the paper's rare class starts at 10,000, beyond this "
        "vocabulary; its out-of-context 'frequent' and 'semantic' classes are not defined reproducibly). Magnitudes: the "
        f"paper's 1.5, 3, 6 inside a wider sweep {', '.join(f'{m:g}' for m in INSTALL_MULTIPLES)} to show saturation. "
        "The install key is the query of the position that reads it, as the paper does not say which key it used; the "
        "write's own key (the other reading) is shown beside it. Two further directions are shown: `readout`, the "
        "paper's `W_O^T W_U[T]` with the head's gated norm at the reading position included (the norm's gate "
        "`silu(z)` is what the paper's formula leaves out; on Mamba-2 it reweights and flips coordinates), and the "
        "exact first-order direction (`logprob_gradient`).",
    ]
