"""``writesae sweep``: train every cell of a grid, the cells spread over the processes torchrun starts."""

from __future__ import annotations

import argparse

from writesae.cli import options

NAME = "sweep"
HELP = "train a grid of WriteSAEs (layers, heads, families, sizes, seeds, input scaling) into one results table"
RESUME_NOTE = "finished cells are kept and never trained again; an unfinished cell continues from its checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", type=options.existing_file, help="a YAML or JSON grid file (format: see writesae.sweep.grid)")
    options.add_device_option(p)
    options.add_threads_option(p)
    options.add_output_options(p, "sweep")
    p.epilog = ("Under torchrun (torchrun --nproc-per-node N $(which writesae) sweep GRID ...) each process "
                "trains its share of the cells; --out must be on a file system every node sees.")


def run(args: argparse.Namespace) -> None:
    from writesae.distributed import process_group
    from writesae.sweep import load_grid, run_sweep

    grid = load_grid(args.grid)
    with process_group(args.device) as world:
        result = run_sweep(grid, args.out, device=args.device, mode=options.output_mode(args), world=world)
    if world.is_main:
        print(f"{len(result.rows)} cells; results table in {result.out_dir / 'report.md'} and {result.out_dir / 'results.csv'}")
