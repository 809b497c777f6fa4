"""``writesae flat-svd``: WriteSAE atoms against a FlatSAE's top-1 SVD in the substitution test (paper Table 6)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options
from writesae.cli.substitution import add_substitution_options

NAME = "flat-svd"
HELP = "WriteSAE atoms vs a FlatSAE projected to rank 1 by SVD, substituted side by side (paper Table 6)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=32, seq_len=128)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="the cell's WriteSAE (writesae train: OUT/sae)")
    p.add_argument("--flat-sae", dest="flat_sae", type=options.sae_dir, required=True,
                   help="a FlatSAE of the same cell (writesae train --variant flat: OUT/sae; "
                        "a --variant bilinear_flat SAE works too)")
    p.add_argument("--svd-of", dest="svd_of", choices=["reconstruction", "atom"],
                   help="top-1 SVD of the flat reconstruction at the firing (default, App. F.4) or of each flat atom")
    add_substitution_options(p, scale="matched_norm, the paper's Table 6", max_firings=3)
    options.add_output_options(p, "flat-svd run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.flat_svd import FlatSVDConfig, FlatSVDTest
    from writesae.protocols.substitution import SubstitutionConfig

    defaults = FlatSVDConfig()
    config = FlatSVDConfig(substitution=common.protocol_config(SubstitutionConfig, args, base=defaults.substitution),
                           svd_of=args.svd_of or defaults.svd_of)  # fmt: skip

    def build(model, tokens):
        sae, flat = common.load_sae(args.sae, model), common.load_sae(args.flat_sae, model)
        return FlatSVDTest(model, sae, tokens, flat_sae=flat, config=config)

    common.run_protocol_command(args, "flat-svd run", build, hidden=("writesae", "flat_svd"))
