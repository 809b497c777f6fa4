"""``writesae sign-test``: the single-position sign test with the target direction v*_T (paper section 5.2)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "sign-test"
HELP = "single-position sign test: write v*_T at one position, does the closed form predict T's logit change? (§5.2)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=500, seq_len=64)
    p.add_argument("--layer", type=options.nonnegative_int, required=True)
    p.add_argument("--head", type=options.nonnegative_int, required=True)
    p.add_argument(
        "--key", choices=["native", "random"], help="the write's key (default: the native key at the position)"
    )
    p.add_argument(
        "--multiple", type=options.positive_float, help="write norm in units of the native write's (default: 1)"
    )
    p.add_argument(
        "--norm", choices=["unscaled", "native"], help="native norm without (default) or with the write's strength"
    )
    p.add_argument(
        "--horizon", type=options.nonnegative_int, help="positions between the write and the read (default: 1)"
    )
    p.add_argument(
        "--positions-per-prompt",
        dest="positions_per_prompt",
        type=options.positive_int,
        help="positions written per prompt (default: 4)",
    )
    options.add_output_options(p, "sign-test run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.sign_test import SignTest, SignTestConfig

    config = common.protocol_config(SignTestConfig, args)

    def build(model, tokens):
        return SignTest(model, tokens, args.layer, args.head, config=config)

    common.run_protocol_command(args, "sign-test run", build, hidden=("predictions",))
