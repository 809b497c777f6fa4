"""``writesae install``: installs during generation (paper section 5.3)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "install"
HELP = "installs during generation (paper section 5.3)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=8, seq_len=64)
    p.add_argument("--layer", type=options.nonnegative_int, required=True)
    p.add_argument("--head", type=options.nonnegative_int, required=True)
    p.add_argument("--new-tokens", dest="new_tokens", type=options.positive_int, help="tokens generated after each prompt")
    p.add_argument("--key", choices=["reader_query", "native"], help="install key (default: the query that reads it)")
    p.add_argument("--direction", choices=["out_proj", "readout", "logprob_gradient"], help="target direction (default: the paper's out_proj)")
    p.add_argument("--norm", choices=["unscaled", "native"], help="install norm (default: the paper's, without the write's strength)")
    p.add_argument("--multiples", type=options.positive_float, nargs="+", help="install magnitudes m (default: 1.5 3 6)")
    options.add_output_options(p, "install run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.install import Install, InstallConfig

    config = common.protocol_config(InstallConfig, args)
    common.run_protocol_command(args, "install run", lambda model, tokens: Install(model, tokens, args.layer, args.head, config=config),
                                hidden=("groups",))  # fmt: skip
