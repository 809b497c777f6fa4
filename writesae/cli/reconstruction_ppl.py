"""``writesae reconstruction-ppl``: perplexity with a layer's states replaced by SAE reconstructions (Table 14)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "reconstruction-ppl"
HELP = "perplexity with a layer's head states replaced by their SAE reconstructions, per head and all heads (Table 14)"
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=32, seq_len=1024)
    p.add_argument(
        "--sae",
        type=options.sae_dir,
        nargs="+",
        required=True,
        help="saved state-SAE folders of one layer, one per head; SAEs of different ranks are compared side by side",
    )
    p.add_argument(
        "--position",
        type=options.nonnegative_int,
        help="the state after this position is replaced; the loss is read after it (default: 511, the paper's)",
    )
    options.add_output_options(p, "reconstruction-ppl run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.reconstruction_ppl import (
        ReconstructionPPL,
        ReconstructionPPLConfig,
    )

    config = common.protocol_config(ReconstructionPPLConfig, args)

    def build(model, tokens):
        return ReconstructionPPL(
            model,
            [common.load_sae(path, model) for path in args.sae],
            tokens,
            config=config,
        )

    common.run_protocol_command(args, "reconstruction-ppl run", build, hidden=("table",))
