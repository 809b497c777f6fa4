"""``writesae amplify``: amplify chosen features at every decoding step while sampling (paper Table 4)."""

from __future__ import annotations

import argparse
import codecs

from writesae.cli import common, options

NAME = "amplify"
HELP = "feature amplification while sampling: newlines per N tokens vs baseline and a random control (paper Table 4)"
RESUME_NOTE = ("records are saved a group of prompts at a time; a resumed run skips the finished groups and ends with "
               "the records of an uninterrupted run")  # fmt: skip


def _text(value: str) -> str:
    """A readout string with backslash escapes (``\\n``) decoded."""
    return codecs.decode(value, "unicode_escape")


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=40, seq_len=32)
    p.add_argument("--sae", type=options.sae_dir, required=True, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument("--doses", type=options.positive_float, nargs="+", help="amplification doses (default: 2 5 10)")
    p.add_argument("--control-dose", dest="control_dose", type=options.positive_float,
                   help="dose of the random-feature control (default: the largest dose)")  # fmt: skip
    p.add_argument("--n-features", dest="n_features", type=options.positive_int, help="top boundary features (10)")
    p.add_argument("--features", type=options.nonnegative_int, nargs="+", help="amplify these atoms instead")
    p.add_argument("--dose-unit", dest="dose_unit", choices=["boundary_code", "state_norm", "absolute"],
                   help="what a dose multiplies (default: each feature's mean boundary code, the paper's)")  # fmt: skip
    p.add_argument("--readout-text", dest="readout_text", type=_text, help="counted in generated text (default: \\n)")
    p.add_argument("--readout-tokens", dest="readout_tokens", type=options.nonnegative_int, nargs="+",
                   help="count these token ids instead of --readout-text")  # fmt: skip
    p.add_argument("--new-tokens", dest="new_tokens", type=options.positive_int, help="tokens sampled (default: 400)")
    p.add_argument("--per-tokens", dest="per_tokens", type=options.positive_int, help="rate per this many tokens (400)")
    p.add_argument("--prompt-length", dest="prompt_length", type=options.positive_int, help="prompt tokens (32)")
    p.add_argument("--temperature", type=options.positive_float, help="sampling temperature (default: 0.7)")
    options.add_output_options(p, "amplify run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.amplification import Amplification, AmplifyConfig

    config = common.protocol_config(AmplifyConfig, args)

    def build(model, tokens):  # the prompts are held out; the features are chosen on training text
        sae = common.load_sae(args.sae, model)
        selection = common.token_blocks(model, args, "train")
        return Amplification(model, sae, tokens, config=config, selection_tokens=selection)

    common.run_protocol_command(args, "amplify run", build, hidden=("conditions",))
