"""``writesae preferred-token``: an atom's preferred token, erased at its firings, written elsewhere (Tables 18-19)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "preferred-token"
HELP = "an atom's preferred token: erasure at its natural firings, writes where it does not fire (paper Tables 18-19)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=64, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument(
        "--atom", type=options.nonnegative_int, help="the atom (default: the register atom that fires most often)"
    )
    p.add_argument(
        "--n-firings", dest="n_firings", type=options.positive_int, help="natural firings erased (default: 150)"
    )
    p.add_argument(
        "--n-nonfiring",
        dest="n_nonfiring",
        type=options.positive_int,
        help="non-firing positions written (default: 150)",
    )
    p.add_argument(
        "--multiples", type=options.positive_float, nargs="+", help="m of the writes m * a* * A (default: 1 2 4)"
    )
    p.add_argument(
        "--detection",
        choices=["same", "disjoint"],
        help="detect the token on the erased firings (default, the paper's) or on a disjoint half",
    )
    options.add_output_options(p, "preferred-token run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.preferred_token import PreferredToken, PreferredTokenConfig

    common.run_sae_protocol(args, "preferred-token run", PreferredTokenConfig, PreferredToken, hidden=("writes",))
