"""``writesae passage-nll``: passage NLL with every register firing edited (paper Fig. 2b)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "passage-nll"
HELP = (
    "passage NLL in bits/token with every register firing's write deleted vs matched-norm random writes (paper Fig. 2b)"
)
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=20, seq_len=128)
    p.add_argument(
        "--sae",
        type=options.sae_dir,
        required=True,
        help="a saved SAE folder (writesae train: OUT/sae)",
    )
    p.add_argument(
        "--atoms",
        choices=["registers", "alive"],
        help="whose firings are edited (default: registers, the paper's)",
    )
    p.add_argument(
        "--register-threshold",
        dest="register_threshold",
        type=options.positive_float,
        help="register iff median cosine >= this (default: the two-component mixture decides)",
    )
    p.add_argument(
        "--scale",
        choices=["activation", "matched_norm"],
        help="the atom condition's scale (default: activation)",
    )
    p.add_argument(
        "--random-mode",
        dest="random_mode",
        choices=["replace", "add"],
        help="random writes replace the native ones (default, the paper's) or are added to them",
    )
    p.add_argument(
        "--max-positions",
        dest="max_positions",
        type=options.positive_int,
        help="edit at most this many firing positions per passage (default: all)",
    )
    options.add_output_options(p, "passage-nll run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.passage_nll import PassageNLL, PassageNLLConfig

    common.run_sae_protocol(args, "passage-nll run", PassageNLLConfig, PassageNLL, hidden=())
