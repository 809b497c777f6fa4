"""What several subcommands load the same way: the model, token blocks, a saved SAE."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch


def load_model(args: argparse.Namespace) -> Any:
    """The `HookedRecurrentModel` named by ``args.model`` on ``args.device`` in ``args.dtype``."""
    from hooked_recurrent import HookedRecurrentModel

    return HookedRecurrentModel.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))


def token_blocks(model: Any, args: argparse.Namespace, split: str = "val") -> torch.Tensor:
    """``--sequences`` blocks of ``--seq-len`` tokens from ``--tokens``, on the model's device."""
    from writesae.cli.options import token_seed
    from writesae.tokens import token_blocks as blocks

    tokens = blocks(model, args.tokens, split=split, n_sequences=args.sequences, seq_len=args.seq_len, seed=token_seed(args))
    return tokens.to(model.cfg.device)


def load_sae(path: Any, model: Any) -> Any:
    """A saved inference WriteSAE, checked file by file, on the model's device."""
    import writesae  # noqa: F401  registers the architecture

    from writesae.sae import WriteSAE

    return WriteSAE.load_from_disk(path, device=str(model.cfg.device))


def print_json(title: str, data: dict[str, Any]) -> None:
    print(f"{title}: {json.dumps(data, indent=2, default=str)}")


def protocol_config(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """A protocol config from the command-line options that share its field names (unset: its
    default, or ``base``'s value when a ``base`` config is given).

    Options given several values (``nargs="+"``) arrive as lists; the configs hold tuples.
    """
    from dataclasses import fields, replace

    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    return cls(**values) if base is None else replace(base, **values)


def restartable_out_dir(args: argparse.Namespace, what: str, finished: str) -> Any:
    """Prepare ``--out`` for a command that keeps no partial results; None when ``--resume`` finds it finished.

    A resumed run that had not finished starts again (and says so); a finished one is reported from
    its ``finished`` file without recomputing. (The protocols keep partial results: see
    `run_protocol_command`.)
    """
    from writesae.cli.options import output_mode
    from writesae.outputs import prepare_output_dir

    mode = output_mode(args)
    out = prepare_output_dir(args.out, mode, what=what)
    if mode == "resume":
        if (out / finished).is_file():
            print(f"{out} holds a finished {what}; nothing to resume. Its result is {out / finished}")
            return None
        print(f"{out} holds an unfinished {what}; the {what} keeps no partial results, so it starts again")
        out = prepare_output_dir(out, "overwrite", what=what)
    return out


PROTOCOL_RESUME_NOTE = ("records are saved sequence by sequence; a resumed run skips the finished ones and ends with "
                        "the records of an uninterrupted run")  # fmt: skip
"""What ``--resume`` keeps for every protocol command (the ``RESUME_NOTE`` of their modules)."""


def run_protocol_command(
    args: argparse.Namespace, what: str, build: Callable[[Any, torch.Tensor], Any], hidden: tuple[str, ...] = ()
) -> Any:
    """Run a protocol into ``--out`` through `writesae.protocols.run.run_protocol`; print and return its result.

    ``--out`` is checked (or emptied, for ``--overwrite``) before the model loads. ``--resume``
    continues an unfinished run from its record log: the units it finished are skipped, its settings
    must equal this command's, and it ends with the records of an uninterrupted run; on a finished
    run no unit runs again, and the summary and report are written again from its records.

    Args:
        args: The parsed command line (``--model``, the token options, ``--out``, ``--resume``/``--overwrite``).
        what: What the run is called in messages (``"substitution run"``).
        build: ``build(model, tokens)`` returns the `Protocol` to run on the model and token blocks.
        hidden: Summary keys left out of the printed summary (long ones).
    """
    from writesae.cli.options import output_mode
    from writesae.outputs import prepare_output_dir
    from writesae.protocols.run import SUMMARY, run_protocol

    mode = output_mode(args)
    out = prepare_output_dir(args.out, mode, what=what)
    if mode == "resume":
        state = "finished: no unit runs again" if (out / SUMMARY).is_file() else "unfinished: its finished units are kept"
        print(f"{out} holds a {what} that is {state}")
    model = load_model(args)
    result = run_protocol(build(model, token_blocks(model, args)), out, mode="resume" if mode == "resume" else "new")
    print_json(what, {k: v for k, v in result.summary.items() if k not in hidden})
    print(f"results in {out}")
    return result


def run_sae_protocol(args: argparse.Namespace, what: str, config_cls: type, protocol_cls: type, hidden: tuple[str, ...]) -> Any:
    """`run_protocol_command` for a protocol that reads a saved SAE (``--sae``): ``protocol_cls(model,
    sae, tokens, config=...)`` with the config built from the command-line options."""
    config = protocol_config(config_cls, args)
    return run_protocol_command(
        args, what, lambda model, tokens: protocol_cls(model, load_sae(args.sae, model), tokens, config=config), hidden
    )
