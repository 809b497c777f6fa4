"""``writesae logit-shift``: the closed-form logit shift (paper section 4)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "logit-shift"
HELP = "the closed-form logit shift (paper section 4)"
RESUME_NOTE = "a finished run is kept; an unfinished one starts again, as it keeps no partial results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=16, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument("--path", choices=["out_proj", "jacobian"])
    p.add_argument("--n-atoms", dest="n_atoms", type=options.positive_int, help="atoms tested")
    options.add_output_options(p, "logit-shift run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.logit_shift import LogitShiftConfig, run_logit_shift

    common.run_sae_protocol(args, "logit-shift run", LogitShiftConfig, run_logit_shift, hidden=("cells", "config"))
