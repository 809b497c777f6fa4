"""Validated option types shared by every ``writesae`` subcommand.

Each type is an argparse ``type=`` callable: it checks one value before any work starts and, when
the value is wrong, raises ``argparse.ArgumentTypeError`` with the valid range and the fix; argparse
then prints ``writesae CMD: error: argument --NAME: MESSAGE`` (the argument, the value, the range)
and exits with status 2. The ``add_*`` helpers give subcommands the same options with the same
names, types and help.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    >>> _ = p.add_argument("--seq-len", type=positive_int)
    >>> p.parse_args(["--seq-len", "64"]).seq_len
    64
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 0 is not a positive whole number; give 1 or more
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from hooked_recurrent.loading.hf import FLOAT_DTYPES

__all__ = [
    "MODEL_DTYPES",
    "STORE_DTYPES",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "device",
    "model_name",
    "token_source",
    "existing_file",
    "store_dir",
    "sae_dir",
    "output_mode",
    "add_device_option",
    "add_model_options",
    "add_threads_option",
    "add_token_options",
    "add_output_options",
    "add_resume_options",
]

# Floating dtypes only: weights and states are real numbers, and an integer store would round them away.
MODEL_DTYPES = tuple(str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES)
STORE_DTYPES = MODEL_DTYPES


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, sizes, lengths)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number; give 1 or more")
    return value


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (indices, offsets)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, scales)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def device(text: str) -> str:
    """A torch device that exists on this machine (checked before the model loads)."""
    from hooked_recurrent.loading import check_device

    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("device=")) from None
    return text


def model_name(text: str) -> str:
    """A hub id, a model folder or a built-in name (a file or an unknown built-in is refused here)."""
    from hooked_recurrent.loading import check_model_name

    try:
        check_model_name(text)
    except (OSError, ValueError, KeyError) as err:
        raise argparse.ArgumentTypeError(str(err.args[0]) if isinstance(err, KeyError) else str(err)) from None
    return text


def token_source(text: str) -> str:
    """``stdlib``, ``random``, ``hf:DATASET[:CONFIG]`` or an existing text file or folder."""
    if text in ("stdlib", "random") or (text.startswith("hf:") and len(text) > 3) or Path(text).exists():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither stdlib, random, hf:DATASET nor an existing file or folder of text"
    )


def existing_file(text: str) -> Path:
    """A file that exists (a grid, a config)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'is a folder' if path.is_dir() else 'no such file'}; give the path of a file")
    return path


def store_dir(text: str) -> Path:
    """A folder written by ``writesae collect`` (it holds ``manifest.json``)."""
    path = Path(text)
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "has no manifest.json"
        raise argparse.ArgumentTypeError(
            f"{text} {what}: it is not a store written by `writesae collect` (a folder with manifest.json)"
        )
    return path


def sae_dir(text: str) -> Path:
    """A saved inference SAE folder (``cfg.json`` + ``sae_weights.safetensors``), not a training checkpoint."""
    from writesae.io import CheckpointError, check_sae_dir

    try:
        check_sae_dir(text)
    except CheckpointError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return Path(text)


def output_mode(args: argparse.Namespace) -> str:
    """``"resume"``, ``"overwrite"`` or ``"new"``, from ``--resume`` / ``--overwrite``."""
    return "resume" if args.resume else "overwrite" if args.overwrite else "new"


def add_device_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--device`` (default: cuda when a GPU is visible); under ``torchrun``, ``cuda`` means each
    process's own GPU (its ``LOCAL_RANK``)."""
    if default is None:
        default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", type=device, default=default,
                        help=f"cpu, cuda, cuda:N or mps (default: {default}; under torchrun, cuda is each "
                             "process's GPU)")  # fmt: skip


def add_model_options(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """The model to load, where, in which dtype, the seed and the CPU threads."""
    if positional:
        parser.add_argument("model", type=model_name,
                            help="hub id, local model folder, or built-in name (stdlib:qwen3.5, stdlib:mamba2)")  # fmt: skip
    add_device_option(parser)
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="model dtype")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the token draw (default 0) and, when given, of the protocol's own random choices "
                             "(default: the protocol config's seed, as in Python)")  # fmt: skip
    add_threads_option(parser)


def token_seed(args: argparse.Namespace) -> int:
    """The seed of a command's token draw: ``--seed``, 0 when not given."""
    return 0 if args.seed is None else args.seed


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads for the command (set by `writesae.cli.running.run_command`)."""
    parser.add_argument("--threads", type=nonnegative_int, default=0,
                        help="torch CPU threads (0: torch's default; 1 on a machine shared with other jobs, where extra "
                             "threads mostly wait for each other)")  # fmt: skip


def add_token_options(parser: argparse.ArgumentParser, sequences: int, seq_len: int) -> None:
    """Where the token blocks come from, how many and how long."""
    parser.add_argument("--tokens", type=token_source, default="stdlib", help="stdlib | PATH | hf:DATASET | random (see writesae.tokens)")
    parser.add_argument("--sequences", type=positive_int, default=sequences, help="token blocks to run")
    parser.add_argument("--seq-len", type=positive_int, default=seq_len, help="tokens per block")


# flag dest -> (the sparsity it belongs to, the config fields it sets)
_SPARSITY_FLAGS = {
    "jumprelu_coefficient": ("jumprelu", ("jumprelu_coefficient",)),
    "jumprelu_init_threshold": ("jumprelu", ("jumprelu_init_threshold",)),
    "jumprelu_bandwidth": ("jumprelu", ("jumprelu_bandwidth", "jumprelu_bandwidth_final")),
    "gated_coefficient": ("gated", ("gated_coefficient",)),
    "gate": ("gated", ("gate",)),
}


def add_sparsity_options(parser: argparse.ArgumentParser) -> None:
    """JumpReLU's and the gated SAE's settings (defaults: docs/design.md §5); `sparsity_settings` reads them."""
    parser.add_argument("--jumprelu-coefficient", type=positive_float,
                        help="jumprelu: lambda on the L0 (default 1e-5, the paper's)")  # fmt: skip
    parser.add_argument("--jumprelu-init-threshold", type=positive_float,
                        help="jumprelu: every atom's initial threshold, in the units training sees (default 1e-4, the "
                             "paper's; with Adam a threshold moves about --lr per step in log space)")  # fmt: skip
    parser.add_argument("--jumprelu-bandwidth", type=positive_float, nargs=2, metavar=("START", "END"),
                        help="jumprelu: kernel bandwidth, cosine from START to END over the run (default 1e-3 1e-5, "
                             "the paper's; the same twice for a constant one)")  # fmt: skip
    parser.add_argument("--gated-coefficient", type=positive_float,
                        help="gated: lambda on the sum of the gate values (default 1e-3, the reference code's)")
    parser.add_argument("--gate", choices=["hard", "soft_sigmoid"],
                        help="gated: the gate in training (default hard; soft_sigmoid is the reference code's "
                             "sigmoid(pi_gate / 0.1))")  # fmt: skip


def sparsity_settings(args: argparse.Namespace, sparsities: list[str] | tuple[str, ...]) -> dict[str, object]:
    """The config fields (TrainerConfig's, and ``jumprelu_init_threshold``) the `add_sparsity_options` flags set.

    Raises:
        ValueError: a flag of a sparsity that is not trained (it would be ignored).
    """
    settings: dict[str, object] = {}
    for dest, (sparsity, fields) in _SPARSITY_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if sparsity not in sparsities:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} applies to {sparsity} SAEs, and none is trained here (sparsity "
                             f"{', '.join(sparsities)}); drop it or train {sparsity}")  # fmt: skip
        settings.update(zip(fields, value if isinstance(value, list) else [value]))
    return settings


def add_output_options(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--out`` and the no-clobber policy: ``--resume`` or ``--overwrite`` an existing folder."""
    if default is None:
        parser.add_argument("--out", type=Path, required=True, help=f"folder of the {what}")
    else:
        parser.add_argument("--out", type=Path, default=Path(default), help=f"folder of the {what} (default: {default})")
    add_resume_options(parser, what)


def add_resume_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--resume`` or ``--overwrite`` an existing ``--out`` (for a command that defines ``--out`` itself)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=f"continue the interrupted {what} in --out")
    group.add_argument("--overwrite", action="store_true", help=f"delete what --out holds and start a new {what}")
