"""``writesae spectra``: spectral audit of every head's states (paper sections 6.6 and 6.11a); no SAE."""

from __future__ import annotations

import argparse

from writesae.cli import common, options

NAME = "spectra"
HELP = "spectral audit of the recurrent states: sigma1/sigma2, effective and stable rank, write reuse (paper 6.11a)"
RESUME_NOTE = ("records are saved layer by layer; a resumed run skips the finished layers and ends with the records of "
               "an uninterrupted run")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=16, seq_len=128)
    p.add_argument("--layers", type=options.nonnegative_int, nargs="+", help="recurrent layers to audit (default: all)")
    p.add_argument("--heads", type=options.nonnegative_int, nargs="+", help="heads audited per layer (default: all)")
    p.add_argument("--skip-first", dest="skip_first", type=options.nonnegative_int,
                   help="leading positions left out (default: 1)")  # fmt: skip
    p.add_argument("--aggregate", choices=["median", "mean"], help="over positions (default: median)")
    p.add_argument("--reuse-moment", dest="reuse_moment", choices=["second_moment", "covariance"],
                   help="moment matrix of the write-reuse score (default: second_moment)")  # fmt: skip
    p.add_argument("--covariance-samples", dest="covariance_samples", type=options.nonnegative_int,
                   help="states per head for the vec(S) covariance spectrum (default: 1024; 0 skips it)")  # fmt: skip
    p.add_argument("--batch-size", dest="batch_size", type=options.positive_int,
                   help="sequences traced at once (default: 8)")  # fmt: skip
    options.add_output_options(p, "spectra run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.spectra import Spectra, SpectraConfig

    config = common.protocol_config(SpectraConfig, args)
    common.run_protocol_command(args, "spectra run", lambda model, tokens: Spectra(model, tokens, config=config),
                                hidden=("layers",))  # fmt: skip
