"""The ``writesae`` command: collect, train, run the paper's protocols, or all of it (``demo``).

Examples::

    writesae demo                                   # offline, the shipped stdlib:qwen3.5, ~minutes on a CPU
    writesae demo --model stdlib:mamba2
    writesae demo --full                            # then every paper protocol on both shipped models, one report
    writesae collect Qwen/Qwen3.5-0.8B --layer 9 --heads 4 --tokens hf:Skylion007/openwebtext \\
        --sequences 5000 --seq-len 1024 --out stores/L9H4 --device cuda --dtype bfloat16
    writesae train stores/L9H4 --layer 9 --head 4 --d-sae 2048 --k 32 --epochs 20 --out saes/L9H4
    writesae sweep grid.yaml --out runs/sweep       # a grid of trainings; under torchrun, spread over GPUs
    writesae substitution Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --tokens hf:Skylion007/openwebtext --out runs/subst
    writesae logit-shift Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --out runs/logit
    writesae install Qwen/Qwen3.5-0.8B --layer 9 --head 4 --out runs/install
    writesae passage-nll Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --tokens hf:Skylion007/openwebtext --out runs/passage-nll
    writesae reconstruction-ppl Qwen/Qwen3.5-0.8B --sae saes/L9H0/sae saes/L9H1/sae --seq-len 1024 --out runs/recon-ppl
    writesae spectra Qwen/Qwen3.5-0.8B --out runs/spectra
    writesae selectivity Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --out runs/selectivity
    writesae flat-svd Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --flat-sae saes/L9H4-flat/sae --out runs/flat-svd
    writesae readers Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --out runs/readers
    writesae preferred-token Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --atom 412 --out runs/preferred-token
    writesae sign-test Qwen/Qwen3.5-0.8B --layer 9 --head 4 --out runs/sign-test
    writesae all-heads Qwen/Qwen3.5-0.8B --saes saes/L9-heads --out runs/all-heads
    writesae amplify Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --out runs/amplify
    writesae families Qwen/Qwen3.5-0.8B --store stores/L9H4 --out runs/families

Every command prints where it wrote its results and the headline figures. Every long command
refuses an output folder that already holds files unless given ``--resume`` (continue it) or
``--overwrite`` (replace it); Ctrl-C or SIGTERM stops it cleanly and prints the command that
resumes it.

Adding a subcommand: write a module in this package with ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args)`` (and ``RESUME_NOTE`` when it takes ``--resume``; see `writesae.cli.options` for the
shared, validated options), then add its module name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from writesae.cli.running import run_command

__all__ = ["main", "build_parser", "COMMANDS"]

# One line per subcommand: the module of this package that defines it.
COMMANDS = (
    "collect",
    "train",
    "sweep",
    "substitution",
    "logit_shift",
    "install",
    "spectra",
    "selectivity",
    "flat_svd",
    "readers",
    "all_heads",
    "amplify",
    "families",
    "demo",
    "dashboard",
    "passage_nll",
    "reconstruction_ppl",
    "preferred_token",
    "sign_test",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand in ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="writesae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{module_name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run, resume_note=getattr(module, "RESUME_NOTE", ""))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``writesae ARGS``; returns the exit status (0 done, 2 bad input, 130/143 stopped)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command(args, argv)


if __name__ == "__main__":
    sys.exit(main())
