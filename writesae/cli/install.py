"""``writesae install``: installs during generation (paper section 5.3)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "install"
HELP = "installs during generation (paper section 5.3)"
RESUME_NOTE = "a finished run is kept; an unfinished one starts again, as it keeps no partial results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=8, seq_len=64)
    p.add_argument("--layer", type=options.nonnegative_int, required=True)
    p.add_argument("--head", type=options.nonnegative_int, required=True)
    p.add_argument("--new-tokens", dest="new_tokens", type=options.positive_int, help="tokens generated after each prompt")
    p.add_argument("--key", choices=["reader_query", "native"], help="install key (default: the query that reads it)")
    p.add_argument("--direction", choices=["out_proj", "logprob_gradient"], help="target direction (default: the paper's out_proj)")
    p.add_argument("--norm", choices=["unscaled", "native"], help="install norm (default: the paper's, without the write's strength)")
    p.add_argument("--multiples", type=options.positive_float, nargs="+", help="install magnitudes m (default: 1.5 3 6)")
    options.add_output_options(p, "install run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.install import InstallConfig, run_install

    out = common.protocol_out_dir(args, "install run")
    if out is None:
        return
    model = common.load_model(args)
    config = common.protocol_config(InstallConfig, args)
    result = run_install(model, common.token_blocks(model, args), args.layer, args.head, config=config, out_dir=out)
    common.print_json("installs (pooled, by m)", {str(g["multiple"]): g for g in result.summary["saturation"]})
    print(f"results in {out}")
