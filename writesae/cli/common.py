"""What several subcommands load the same way: the model, token blocks, a saved SAE."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch


def load_model(args: argparse.Namespace) -> Any:
    """The `HookedRecurrentModel` named by ``args.model`` on ``args.device`` in ``args.dtype``."""
    from hooked_recurrent import HookedRecurrentModel

    return HookedRecurrentModel.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))


def token_blocks(model: Any, args: argparse.Namespace, split: str = "val") -> torch.Tensor:
    """``--sequences`` blocks of ``--seq-len`` tokens from ``--tokens``, on the model's device."""
    from writesae.tokens import token_blocks as blocks

    tokens = blocks(model, args.tokens, split=split, n_sequences=args.sequences, seq_len=args.seq_len, seed=args.seed)
    return tokens.to(model.cfg.device)


def load_sae(path: Any, model: Any) -> Any:
    """A saved inference WriteSAE, checked file by file, on the model's device."""
    import writesae  # noqa: F401  registers the architecture

    from writesae.sae import WriteSAE

    return WriteSAE.load_from_disk(path, device=str(model.cfg.device))


def print_json(title: str, data: dict[str, Any]) -> None:
    print(f"{title}: {json.dumps(data, indent=2, default=str)}")


def protocol_config(cls: type, args: argparse.Namespace) -> Any:
    """A protocol config from the command-line options that share its field names (unset: its default)."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**values)


def protocol_out_dir(args: argparse.Namespace, what: str, finished: str = "summary.json") -> Any:
    """Prepare ``--out`` for a protocol run; None when ``--resume`` finds the run already finished.

    The protocols keep no partial results yet: a resumed run that had not finished starts again
    (and says so); a finished one is reported from its ``finished`` file (``summary.json``) without
    recomputing.
    """
    from writesae.cli.options import output_mode
    from writesae.outputs import prepare_output_dir

    mode = output_mode(args)
    out = prepare_output_dir(args.out, mode, what=what)
    if mode == "resume":
        summary = out / finished
        if summary.is_file():
            print(f"{out} holds a finished {what}; nothing to resume. Its result is {summary}")
            return None
        print(f"{out} holds an unfinished {what}; the {what} keeps no partial results, so it starts again")
        out = prepare_output_dir(out, "overwrite", what=what)
    return out


def run_sae_protocol(args: argparse.Namespace, what: str, config_cls: type, run: Any, hidden: tuple[str, ...]) -> None:
    """Run a protocol that reads a saved SAE (``--sae``) into ``--out`` and print its summary
    (less the ``hidden`` keys, which are long)."""
    out = protocol_out_dir(args, what)
    if out is None:
        return
    model = load_model(args)
    sae = load_sae(args.sae, model)
    result = run(model, sae, token_blocks(model, args), config=protocol_config(config_cls, args), out_dir=out)
    print_json(what, {k: v for k, v in result.summary.items() if k not in hidden})
    print(f"results in {out}")
