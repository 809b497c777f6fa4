"""``writesae collect``: capture states or writes of (layer, head) cells into a store."""

from __future__ import annotations

import argparse

import torch

from writesae.cli import common, options

NAME = "collect"
HELP = "capture states or writes of (layer, head) cells into a store"
RESUME_NOTE = "saved every --checkpoint-every batches; the resumed store equals an uninterrupted one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=256, seq_len=128)
    p.add_argument("--layer", type=options.nonnegative_int, nargs="+", required=True, help="matrix-recurrent layers")
    p.add_argument("--heads", type=options.nonnegative_int, nargs="+", default=None, help="heads (default: all)")
    p.add_argument("--kind", choices=["state", "write"], default="state")
    p.add_argument("--positions-per-sequence", type=options.positive_int, default=None,
                   help="random positions kept per sequence (default: all)")  # fmt: skip
    p.add_argument("--skip-first", type=options.nonnegative_int, default=0, help="positions ignored at each sequence start")
    p.add_argument("--batch-size", type=options.positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--store-dtype", choices=options.STORE_DTYPES, default="float32", help="dtype on disk")
    p.add_argument("--center", action="store_true", help="also store each cell's mean training sample")
    p.add_argument("--checkpoint-every", type=options.positive_int, default=16, help="batches between progress checkpoints")
    options.add_output_options(p, "store")
    p.epilog = ("Under torchrun (torchrun --nproc-per-node N $(which writesae) collect ...) each process runs its "
                "own model copy over its share of the batches and writes its own shards; the store equals one "
                "process's, sample for sample.")


def run(args: argparse.Namespace) -> None:
    from writesae.distributed import process_group, rank_device
    from writesae.store import collect

    with process_group(args.device) as world:
        args.device = str(rank_device(args.device, world))  # under torchrun: this process's GPU
        model = common.load_model(args)
        tokens = common.token_blocks(model, args, split="train")
        store = collect(model, tokens, layers=args.layer, heads=args.heads, kind=args.kind, out_dir=args.out,
                        positions_per_sequence=args.positions_per_sequence, skip_first=args.skip_first,
                        batch_size=args.batch_size, dtype=getattr(torch, args.store_dtype), center=args.center,
                        mode=options.output_mode(args), checkpoint_every=args.checkpoint_every, world=world)  # fmt: skip
    if not world.is_main:
        return
    for layer in args.layer:
        for head in store.manifest["heads"]:
            print(f"L{layer} H{head}: {store.num_samples(layer, head, 'train')} train / "
                  f"{store.num_samples(layer, head, 'val')} val samples, {store.bytes_per_sample(layer, head):.0f} B each")
    print(f"store written to {args.out}")
