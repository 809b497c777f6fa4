"""``writesae demo``: the whole pipeline offline on a shipped model, with headline figures."""

from __future__ import annotations

import argparse

from writesae.cli import options

NAME = "demo"
HELP = "the whole pipeline offline on a shipped model, with headline figures"
RESUME_NOTE = ("the stores and the SAE training continue from their checkpoints, the protocols from their record "
               "logs; finished stages are kept")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=options.model_name, default="stdlib:qwen3.5",
                   help="stdlib:qwen3.5 (default) or stdlib:mamba2, or any model")  # fmt: skip
    p.add_argument("--threads", type=options.nonnegative_int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--layer", type=options.nonnegative_int, default=None)
    p.add_argument("--head", type=options.nonnegative_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    options.add_device_option(p, default="cpu")  # sized for a CPU; --device cuda runs it on a GPU
    options.add_output_options(p, "demo run", default="runs/demo")


def run(args: argparse.Namespace) -> None:
    from writesae.demo import run_demo

    run_demo(model_name=args.model, out_dir=args.out, layer=args.layer, head=args.head, seed=args.seed,
             threads=args.threads or None, mode=options.output_mode(args), device=args.device)  # fmt: skip
