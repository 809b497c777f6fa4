"""``writesae logit-shift``: the logit shift of atoms written into the state (paper section 4)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "logit-shift"
HELP = "the logit shift of atoms written into the state: the paper's formula against the exact first-order shift (paper section 4)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=16, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument("--epsilons", type=options.positive_float, nargs="+", help="perturbation sizes (default: 0.1 0.3 1 3)")
    p.add_argument("--eps-scale", dest="eps_scale", choices=["absolute", "state_norm"],
                   help="eps in the atoms' units (default) or times the median state norm")
    p.add_argument("--n-atoms", dest="n_atoms", type=options.positive_int, help="atoms tested")
    options.add_output_options(p, "logit-shift run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.logit_shift import LogitShift, LogitShiftConfig

    common.run_sae_protocol(args, "logit-shift run", LogitShiftConfig, LogitShift, hidden=("ladder", "atoms"))
