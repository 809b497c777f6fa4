"""``writesae substitution``: the substitution test (paper section 3)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "substitution"
HELP = "the substitution test (paper section 3)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=32, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    add_substitution_options(p)
    options.add_output_options(p, "substitution run")


def add_substitution_options(
    p: argparse.ArgumentParser, scale: str = "activation, the paper's main text", max_firings: int = 30
) -> None:
    """The options of a `SubstitutionConfig` (shared with the commands that run substitution tests);
    ``scale`` and ``max_firings`` are the defaults their help shows."""
    p.add_argument("--scale", choices=["activation", "matched_norm"], help=f"headline scale (default: {scale})")
    p.add_argument("--substitute", choices=["firing", "dominant"], help="headline atom (default: firing, the paper's main text)")
    p.add_argument("--random-control", dest="random_control", choices=["nonfiring_atom", "uniform_rank1", "per_coordinate"],
                   help="the random control (default: nonfiring_atom, the paper's)")
    p.add_argument("--kl-direction", dest="kl_direction", choices=["edited||base", "base||edited"])
    p.add_argument("--write", choices=["native", "delta"])
    p.add_argument("--n-atoms", dest="n_atoms", type=options.positive_int, help="test the most frequent atoms only")
    p.add_argument("--max-firings-per-atom", dest="max_firings_per_atom", type=options.positive_int,
                   help=f"firings tested per atom (default: {max_firings})")
    p.add_argument("--register-threshold", dest="register_threshold", type=options.positive_float,
                   help="register iff median cosine >= this (default: the two-component mixture decides)")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.substitution import SubstitutionConfig, SubstitutionTest

    common.run_sae_protocol(args, "substitution run", SubstitutionConfig, SubstitutionTest, hidden=("population",))
