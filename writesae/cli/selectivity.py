"""``writesae selectivity``: direction-space selectivity of atom perturbations vs matched-norm controls (Figs. 9-10)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "selectivity"
HELP = "top-K selectivity of atom perturbations vs matched-norm rank-1 controls, and of the controls (paper Figs. 9-10)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=16, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument("--ks", type=options.positive_int, nargs="+", help="K of the top-K sets (default: 1 5 10 20 30 32)")
    p.add_argument("--epsilon", type=options.positive_float, help="perturbation size (default: 1)")
    p.add_argument("--eps-scale", dest="eps_scale", choices=["absolute", "state_norm", "write_norm"],
                   help="epsilon's unit (default: absolute, the paper's)")  # fmt: skip
    p.add_argument("--rank-by", dest="rank_by", choices=["increase", "absolute"],
                   help="top-K by logit increase (default) or by absolute change")  # fmt: skip
    p.add_argument("--read-offset", dest="read_offset", type=options.nonnegative_int,
                   help="compare the logits this many positions after the perturbation (default: 0)")  # fmt: skip
    p.add_argument("--n-atoms", dest="n_atoms", type=options.positive_int, help="the most frequent atoms (default: 50)")
    p.add_argument("--max-firings-per-atom", dest="max_firings_per_atom", type=options.positive_int)
    options.add_output_options(p, "selectivity run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.selectivity import Selectivity, SelectivityConfig

    common.run_sae_protocol(args, "selectivity run", SelectivityConfig, Selectivity, hidden=("pairs",))
