"""``writesae demo``: the whole pipeline, offline, on a shipped model, with the headline figures.

1. Capture the writes (or the states) of one (layer, head) on training-split stdlib text; the
   cell defaults to the head with the longest memory (slowest decay).
2. Train a WriteSAE (bilinear encoder, rank-1 atoms, TopK) on them, on the data scaled to unit mean
   square (``input_scaling="unit_mean_square"``: these small models' writes are ~1e-2, where raw
   training leaves most atoms dead; the saved SAE acts on raw writes).
3. Splice it back with the error term (logits unchanged) and read its atoms.
4. Substitution test on held-out text; closed-form logit shift; installs during generation.

The demo trains on writes by default (``input="write"``): in this small model the long-memory
head's states are sums of dozens of decayed writes, so atoms learned from states describe
accumulated memory rather than single writes, and a state-trained dictionary is the wrong tool for
replacing one write. ``input="state"`` runs the paper's setting. The logit shift is reported
through both output paths, with eps relative to the state's norm.

Everything is written under ``out_dir`` (store, SAE, one run directory per protocol, summary.json)
and the numbers are printed. Sizes are chosen to finish in a few minutes on 2 CPU cores; they are far
smaller than the paper's, so the figures illustrate the protocols rather than reproduce the paper.
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

__all__ = ["run_demo", "DEMO_SIZES"]

DEMO_SIZES = dict(
    store_sequences=256, seq_len=128, d_sae=512, k=8, epochs=20,
    substitution_sequences=32, substitution_atoms=48, firings_per_atom=8,
    shift_prompts=12, shift_atoms=8, install_prompts=8,
)


def _log(message: str, start: float) -> None:
    print(f"[{time.time() - start:6.1f} s] {message}", flush=True)


def run_demo(
    model_name: str = "stdlib:qwen3.5",
    out_dir: str | Path = "runs/demo",
    layer: int | None = None,
    head: int | None = None,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    input: str = "write",
    threads: int | None = 1,
    mode: OutputMode = "new",
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the pipeline and return (and print) the headline figures.

    ``threads`` defaults to 1: the demo's model is small, and on a machine shared with other jobs
    extra OpenMP threads mostly wait for each other (None keeps torch's setting).

    ``mode`` is the output folder's policy (`writesae.outputs.prepare_output_dir`): ``"new"``
    refuses a folder holding files; ``"resume"`` continues an interrupted demo (the store and the
    training from their checkpoints; the protocols run again) and ends with the figures of an
    uninterrupted run; ``"overwrite"`` starts afresh.

    ``device`` places the model, the tokens and the SAE (``"cuda"`` on a GPU).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    from hooked_recurrent import HookedRecurrentModel
    from writesae.protocols.install import InstallConfig, run_install
    from writesae.protocols.logit_shift import LogitShiftConfig, run_logit_shift
    from writesae.protocols.substitution import SubstitutionConfig, run_substitution
    from writesae.store import collect
    from writesae.tokens import token_blocks
    from writesae.trainer import TrainerConfig
    from writesae.training import train_on_store

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

    train_tokens = token_blocks(model, "stdlib", split="train", n_sequences=sizes["store_sequences"], seq_len=sizes["seq_len"], seed=seed).to(device)
    store = collect(model, train_tokens, layers=[layer], heads=[head], kind=input, out_dir=out / "store", skip_first=1,
                    verbose=False, mode=_stage_mode(out / "store", mode))
    _log(f"captured {store.num_samples(layer, head, 'train')} train / {store.num_samples(layer, head, 'val')} val {input}s", start)

    trainer = TrainerConfig(epochs=sizes["epochs"], batch_size=128, lr=2e-3, warmup_steps=20, progress=False, out_dir=out / "training",
                            input_scaling="unit_mean_square")
    resume_from = out / "training" / "checkpoint"
    if not resume_from.is_dir():  # nothing to continue (a new run, or one stopped before its first checkpoint)
        shutil.rmtree(out / "training", ignore_errors=True)
        resume_from = None
    sae, metrics = train_on_store(store, layer, head, d_sae=sizes["d_sae"], k=sizes["k"], trainer=trainer, seed=seed,
                                  resume_from=resume_from, device=device)
    sae.save_model(out / "sae")
    _log(f"WriteSAE d_sae={sizes['d_sae']} k={sizes['k']}: val explained variance {metrics['val_explained_variance']:.3f}, "
         f"dead {metrics['val_dead_fraction']:.1%}", start)

    held_out = token_blocks(model, "stdlib", split="val", n_sequences=sizes["substitution_sequences"], seq_len=sizes["seq_len"], seed=seed).to(device)
    with torch.no_grad():
        plain = model(held_out[:2])
        spliced = model.run_with_saes(held_out[:2], saes=[sae], use_error_term=True)
    exact = bool(torch.equal(plain, spliced))
    _log(f"spliced with the error term: logits unchanged = {exact}", start)

    substitution = run_substitution(
        model, sae, held_out,
        config=SubstitutionConfig(max_firings_per_atom=sizes["firings_per_atom"], n_bootstrap=1000),
        atoms=_frequent_atoms(model, sae, held_out, layer, head, sizes["substitution_atoms"]),
        out_dir=out / "substitution", verbose=False,
    )
    s = substitution.summary
    _log(f"substitution: atom beats deletion on {s['win_rate']:.1%} of {s['n_firings']} firings "
         f"(Wilson 95% [{s['win_rate_wilson95'][0]:.1%}, {s['win_rate_wilson95'][1]:.1%}])", start)

    shifts = {}
    for path in ("out_proj", "jacobian"):
        shift = run_logit_shift(
            model, sae, held_out[: sizes["shift_prompts"]],
            config=LogitShiftConfig(epsilons=(0.01, 0.03, 0.1, 0.3), eps_scale="state_norm", path=path,
                                    n_atoms=sizes["shift_atoms"], positions_per_prompt=2),
            out_dir=out / f"logit_shift_{path}", verbose=False,
        )
        shifts[path] = {k: shift.summary[k] for k in ("n_cells", "median_r2_zero_parameter", "median_r2_fitted_gain", "median_sign_agreement")}
        _log(f"logit shift ({path} path): median R^2 {shift.summary['median_r2_zero_parameter']:.3f} (zero-parameter), "
             f"{shift.summary['median_r2_fitted_gain']:.3f} (fitted gain)", start)

    install = run_install(
        model, held_out[: sizes["install_prompts"], :64], layer, head,
        config=InstallConfig(ends_from_last=(0, 2), targets_per_class=1, new_tokens=12),
        out_dir=out / "install", verbose=False,
    )
    pooled = {g["multiple"]: g for g in install.summary["groups"] if g["target_class"] == "pooled"}
    _log("installs: " + ", ".join(
        f"{m}x: target {g['in_continuation']:.0%} vs {g['in_base_continuation']:.0%} unedited, rank improved {g['rank_improved']:.0%}"
        for m, g in pooled.items()), start)

    headline = {
        "model": model_name,
        "cell": {"layer": layer, "head": head},
        "sae": {"input": input, "d_sae": sizes["d_sae"], "k": sizes["k"], **metrics},
        "splice_with_error_term_exact": exact,
        "substitution": {k: s[k] for k in ("n_firings", "win_rate", "win_rate_wilson95", "strict_chain_rate",
                                           "wilcoxon_p_atom_vs_delete", "cliffs_delta_delete_vs_atom", "median_kl")},
        "population": {k: s["population"].get(k) for k in ("n_atoms", "mean_atom_win_rate", "registers", "bundles", "delta_bic")},
        "logit_shift": shifts,
        "install_pooled": pooled,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_text(out / "summary.json", json.dumps(headline, indent=2, default=str))
    _log(f"all results under {out}/ (summary.json, substitution/, logit_shift_*/, install/, sae/, store/)", start)
    return headline


def _stage_mode(path: Path, mode: OutputMode) -> OutputMode:
    """A stage folder continues when the demo resumes and the stage had started; else it is new."""
    return "resume" if mode == "resume" and holds_files(path) else "new"


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


def _frequent_atoms(model: Any, sae: Any, tokens: torch.Tensor, layer: int, head: int, n: int) -> list[int]:
    from writesae.protocols.cell import Cell, encode_trace, trace_cell

    from writesae.protocols.cell import sae_cell

    _, kind = sae_cell(model, sae)
    trace = trace_cell(model, tokens, Cell(layer, head), with_states=kind == "state")
    counts = (encode_trace(sae, trace, kind) > 0).flatten(0, 1).sum(0)
    return [int(a) for a in counts.argsort(descending=True)[:n] if counts[a] > 0]
