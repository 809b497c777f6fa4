"""``writesae readers``: which later heads read a register atom (paper Table 1, Fig. 11d)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "readers"
HELP = "reader traces: later heads ranked by how much an atom's write moves them over random writes (paper Table 1)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=16, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument("--readers", dest="reader_kinds", choices=["attention", "recurrent"], nargs="+",
                   help="later heads that may read (default: attention; none in Mamba-2: recurrent)")  # fmt: skip
    p.add_argument("--edit", choices=["ablate", "amplify"], help="remove the atom at its firings (default) or add it")
    p.add_argument("--atom-pool", dest="atom_pool", choices=["registers", "frequent"],
                   help="atoms traced (default: registers)")  # fmt: skip
    p.add_argument("--n-atoms", dest="n_atoms", type=options.positive_int, help="atoms traced (default: 3)")
    p.add_argument("--max-firings-per-atom", dest="max_firings_per_atom", type=options.positive_int)
    p.add_argument("--window", type=options.positive_int, help="positions after each firing compared (default: 16)")
    p.add_argument("--n-random", dest="n_random", type=options.positive_int, help="random edits per firing (default 4)")
    p.add_argument("--register-threshold", dest="register_threshold", type=options.positive_float,
                   help="register iff median cosine >= this (default: the two-component mixture decides)")  # fmt: skip
    options.add_output_options(p, "readers run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.readers import Readers, ReadersConfig

    common.run_sae_protocol(args, "readers run", ReadersConfig, Readers, hidden=("ranking",))
