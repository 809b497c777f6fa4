"""``writesae train``: train a WriteSAE on one cell of a store."""

from __future__ import annotations

import argparse
from pathlib import Path

from writesae.cli import common, options

NAME = "train"
HELP = "train a WriteSAE on one cell of a store"
RESUME_NOTE = ("saved after every epoch, or every --checkpoint-every steps; the resumed run ends with the "
               "uninterrupted run's weights")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=options.store_dir, help="a store written by `writesae collect`")
    p.add_argument("--layer", type=options.nonnegative_int, required=True)
    p.add_argument("--head", type=options.nonnegative_int, required=True)
    options.add_threads_option(p)
    p.add_argument("--d-sae", type=options.positive_int, default=2048, help="dictionary size")
    p.add_argument("--k", type=options.positive_int, default=32, help="active atoms per sample (topk, batchtopk)")
    p.add_argument("--variant", default="bilinear",
                   choices=["bilinear", "flat", "matrix", "bilinear_tied", "bilinear_flat"])  # fmt: skip
    p.add_argument("--rank", type=options.positive_int, default=1,
                   help="rank of each atom's factors (bilinear_flat: of its encoder, the decoder is dense)")
    p.add_argument("--sparsity", default="topk", choices=["topk", "batchtopk", "jumprelu", "gated"],
                   help="jumprelu and gated codes are sparse by their thresholds (--k does not apply)")  # fmt: skip
    options.add_sparsity_options(p)
    p.add_argument("--epochs", type=options.positive_int, default=20)
    p.add_argument("--batch-size", type=options.positive_int, default=256)
    p.add_argument("--lr", type=options.positive_float, default=3e-4, help="peak learning rate")
    p.add_argument("--input-scaling", default="none", choices=["none", "unit_mean_square"],
                   help="train on the data scaled to unit mean square (folded back at the end); "
                        "'none' is the paper's recipe")  # fmt: skip
    p.add_argument("--checkpoint-every", type=options.positive_int, default=None,
                   help="steps between checkpoints (default: after every epoch)")  # fmt: skip
    p.add_argument("--seed", type=int, default=42)
    options.add_device_option(p)
    options.add_output_options(p, "training run")
    p.epilog = ("Under torchrun (torchrun --nproc-per-node N $(which writesae) train ...) the processes train the "
                "one SAE data-parallel: each takes its share of every --batch-size batch.")


def _prepare(out_dir: Path, mode: str) -> tuple[Path, Path | None]:
    """The run's folder and the checkpoint to resume from (None: start afresh)."""
    from writesae.outputs import prepare_output_dir

    out = prepare_output_dir(out_dir, mode, what="training run")
    if mode != "resume":
        return out, None
    if (out / "checkpoint").is_dir():
        print(f"resuming from {out / 'checkpoint'}")
        return out, out / "checkpoint"
    print(f"{out} has no checkpoint yet (the run stopped before its first one): starting it again")
    return prepare_output_dir(out, "overwrite", what="training run"), None


def run(args: argparse.Namespace) -> None:
    from writesae.distributed import on_main, process_group, rank_device
    from writesae.trainer import TrainerConfig
    from writesae.training import train_on_store

    penalty = options.sparsity_settings(args, [args.sparsity])  # refused before any folder is made
    sae_settings = {k: penalty.pop(k) for k in ("jumprelu_init_threshold",) if k in penalty}
    with process_group(args.device) as world:
        out, resume_from = on_main(lambda: _prepare(args.out, options.output_mode(args)), world)
        lr_min = min(3e-5, args.lr)  # the paper's floor, or the peak when that is lower
        trainer = TrainerConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_min=lr_min, seed=args.seed,
                                out_dir=out, input_scaling=args.input_scaling, checkpoint_every=args.checkpoint_every,
                                progress=world.is_main, **penalty)  # fmt: skip
        sae, metrics = train_on_store(args.store, args.layer, args.head, d_sae=args.d_sae, k=args.k, seed=args.seed,
                                      trainer=trainer, variant=args.variant, rank=args.rank, sparsity=args.sparsity,
                                      resume_from=resume_from, world=world, **sae_settings,
                                      device=str(rank_device(args.device, world)))  # fmt: skip
    if world.is_main:
        sae.save_model(out / "sae")
        common.print_json("validation (best checkpoint)", metrics)
        print(f"SAE written to {out / 'sae'} (load with sae_lens.SAE.load_from_disk after `import writesae`)")
