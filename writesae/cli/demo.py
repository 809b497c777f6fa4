"""``writesae demo``: the whole pipeline offline on a shipped model, with headline figures.

``writesae demo --full`` runs the demo on both shipped models (or on ``--model`` alone), then every
paper protocol of `writesae.full_demo.FULL_PROTOCOLS` on each, and writes one report beside the
paper's reference values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from writesae.cli import options

NAME = "demo"
HELP = "the whole pipeline offline on a shipped model, with headline figures (--full: every paper protocol)"
RESUME_NOTE = ("the stores and the SAE training continue from their checkpoints, the protocols from their record "
               "logs; finished stages are kept")  # fmt: skip
DEFAULT_MODEL, DEFAULT_OUT, DEFAULT_FULL_OUT = "stdlib:qwen3.5", Path("runs/demo"), Path("runs/demo-full")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=options.model_name, default=None,
                   help=f"{DEFAULT_MODEL} (default) or stdlib:mamba2, or any model; with --full, default: both shipped "
                        "models")  # fmt: skip
    p.add_argument("--full", action="store_true",
                   help="after the demo, run every paper protocol and write one report with the paper's reference "
                        f"values (default --out {DEFAULT_FULL_OUT}; sized for about 20 minutes on 2 idle CPU "
                        "cores)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="with --full: tiny sizes, a check that every stage runs")
    p.add_argument("--jobs", type=options.positive_int, default=None,
                   help="with --full: models run at once, one process each (default: one per CPU)")  # fmt: skip
    p.add_argument("--threads", type=options.nonnegative_int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--layer", type=options.nonnegative_int, default=None)
    p.add_argument("--head", type=options.nonnegative_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    options.add_device_option(p, default="cpu")  # sized for a CPU; --device cuda runs it on a GPU
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder of the demo run (default: {DEFAULT_OUT}; with --full, "
                        f"{DEFAULT_FULL_OUT})")  # fmt: skip
    options.add_resume_options(p, "demo run")


def run(args: argparse.Namespace) -> None:
    args.out = args.out or (DEFAULT_FULL_OUT if args.full else DEFAULT_OUT)
    if not args.full:
        if args.quick or args.jobs:
            raise ValueError("--quick and --jobs go with --full (the quick check of every stage; models at once)")
        from writesae.demo import run_demo

        run_demo(model_name=args.model or DEFAULT_MODEL, out_dir=args.out, layer=args.layer, head=args.head,
                 seed=args.seed, threads=args.threads or None, mode=options.output_mode(args),
                 device=args.device)  # fmt: skip
        return
    from writesae.full_demo import SHIPPED_MODELS, run_full_demo

    run_full_demo(models=(args.model,) if args.model else SHIPPED_MODELS, out_dir=args.out,
                  preset="tiny" if args.quick else "full", jobs=args.jobs, layer=args.layer, head=args.head,
                  seed=args.seed, threads=args.threads or None, mode=options.output_mode(args),
                  device=args.device)  # fmt: skip
