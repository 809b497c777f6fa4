"""``writesae all-heads``: the substitution test on every head of a layer, one SAE per head (paper Table 12)."""

from __future__ import annotations

import argparse
from pathlib import Path

from writesae.cli import common, options
from writesae.cli.substitution import add_substitution_options

NAME = "all-heads"
HELP = ("the substitution test on every head of a layer, one SAE per head: per-head win rates, mean +- sd "
        "(paper Table 12)")
RESUME_NOTE = common.PROTOCOL_RESUME_NOTE


def sae_dirs(text: str) -> list[Path]:
    """A saved SAE folder, or a folder whose subfolders are saved SAE folders (one per head)."""
    from writesae.io import CheckpointError, check_sae_dir

    path = Path(text)
    try:
        check_sae_dir(path)
        return [path]
    except CheckpointError as err:
        inner = sorted(p for p in path.glob("*/") if (p / "cfg.json").is_file()) if path.is_dir() else []
        if not inner:
            message = f"{err}; or give a folder whose subfolders are saved SAE folders"
            raise argparse.ArgumentTypeError(message) from None
        return [options.sae_dir(str(p)) for p in inner]


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=32, seq_len=128)
    p.add_argument("--saes", type=sae_dirs, nargs="+", required=True,
                   help="one saved SAE per head of one layer: SAE folders, or a folder holding them")  # fmt: skip
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="count the heads above these win rates (default: 0.85 0.88)")
    add_substitution_options(p, max_firings=200)
    options.add_output_options(p, "all-heads run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.all_heads import AllHeadsConfig, AllHeadsTest
    from writesae.protocols.substitution import SubstitutionConfig

    defaults = AllHeadsConfig()
    config = AllHeadsConfig(substitution=common.protocol_config(SubstitutionConfig, args, base=defaults.substitution),
                            thresholds=tuple(args.thresholds or defaults.thresholds))  # fmt: skip
    paths = [path for group in args.saes for path in group]

    def build(model, tokens):
        return AllHeadsTest(model, [common.load_sae(path, model) for path in paths], tokens, config=config)

    common.run_protocol_command(args, "all-heads run", build)
