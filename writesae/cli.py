"""The ``writesae`` command: collect, train, run the paper's protocols, or all of it (``demo``).

Examples::

    writesae demo                                   # offline, the shipped stdlib:qwen3.5, ~minutes on a CPU
    writesae demo --model stdlib:mamba2
    writesae collect Qwen/Qwen3.5-0.8B --layer 9 --heads 4 --tokens hf:Skylion007/openwebtext \\
        --sequences 5000 --seq-len 1024 --out stores/L9H4 --device cuda --dtype bfloat16
    writesae train stores/L9H4 --layer 9 --head 4 --d-sae 2048 --k 32 --epochs 20 --out saes/L9H4
    writesae substitution Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --tokens hf:Skylion007/openwebtext --out runs/subst
    writesae logit-shift Qwen/Qwen3.5-0.8B --sae saes/L9H4/sae --out runs/logit
    writesae install Qwen/Qwen3.5-0.8B --layer 9 --head 4 --out runs/install

Every command prints where it wrote its results and the headline figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]


def _model(args: argparse.Namespace) -> Any:
    from hooked_recurrent import HookedRecurrentModel

    dtype = getattr(torch, args.dtype)
    return HookedRecurrentModel.from_pretrained(args.model, device=args.device, dtype=dtype)


def _tokens(model: Any, args: argparse.Namespace, split: str = "val") -> torch.Tensor:
    from writesae.tokens import token_blocks

    return token_blocks(model, args.tokens, split=split, n_sequences=args.sequences, seq_len=args.seq_len, seed=args.seed).to(
        model.cfg.device
    )


def _load_sae(path: str, model: Any) -> Any:
    import writesae  # noqa: F401  registers the architecture

    from writesae.sae import WriteSAE

    return WriteSAE.load_from_disk(path, device=str(model.cfg.device))


def _print_json(title: str, data: dict[str, Any]) -> None:
    print(f"{title}: {json.dumps(data, indent=2, default=str)}")


def cmd_collect(args: argparse.Namespace) -> None:
    from writesae.store import collect

    model = _model(args)
    tokens = _tokens(model, args, split="train")
    store = collect(model, tokens, layers=args.layer, heads=args.heads, kind=args.kind, out_dir=args.out,
                    positions_per_sequence=args.positions_per_sequence, batch_size=args.batch_size,
                    dtype=getattr(torch, args.store_dtype), center=args.center)
    for layer in args.layer:
        for head in store.manifest["heads"]:
            print(f"L{layer} H{head}: {store.num_samples(layer, head, 'train')} train / "
                  f"{store.num_samples(layer, head, 'val')} val samples, {store.bytes_per_sample(layer, head):.0f} B each")
    print(f"store written to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from writesae.trainer import TrainerConfig
    from writesae.training import train_on_store

    trainer = TrainerConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out_dir=args.out,
                            input_scaling=args.input_scaling)
    sae, metrics = train_on_store(args.store, args.layer, args.head, d_sae=args.d_sae, k=args.k, seed=args.seed,
                                  trainer=trainer, variant=args.variant, rank=args.rank, sparsity=args.sparsity)
    sae.save_model(Path(args.out) / "sae")
    _print_json("validation", metrics)
    print(f"SAE written to {Path(args.out) / 'sae'} (load with sae_lens.SAE.load_from_disk after `import writesae`)")


def _config(cls: type, args: argparse.Namespace) -> Any:
    """A protocol config from the command-line options that share its field names."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**values)


def cmd_substitution(args: argparse.Namespace) -> None:
    from writesae.protocols.substitution import SubstitutionConfig, run_substitution

    model = _model(args)
    sae = _load_sae(args.sae, model)
    result = run_substitution(model, sae, _tokens(model, args), config=_config(SubstitutionConfig, args), out_dir=args.out)
    _print_json("substitution", {k: v for k, v in result.summary.items() if k not in ("population", "config")})
    print(f"results in {args.out}")


def cmd_logit_shift(args: argparse.Namespace) -> None:
    from writesae.protocols.logit_shift import LogitShiftConfig, run_logit_shift

    model = _model(args)
    sae = _load_sae(args.sae, model)
    result = run_logit_shift(model, sae, _tokens(model, args), config=_config(LogitShiftConfig, args), out_dir=args.out)
    _print_json("logit shift", {k: v for k, v in result.summary.items() if k not in ("cells", "config")})
    print(f"results in {args.out}")


def cmd_install(args: argparse.Namespace) -> None:
    from writesae.protocols.install import InstallConfig, run_install

    model = _model(args)
    result = run_install(model, _tokens(model, args), args.layer, args.head, config=_config(InstallConfig, args), out_dir=args.out)
    pooled = [g for g in result.summary["groups"] if g["target_class"] == "pooled"]
    _print_json("installs (pooled)", {str(g["multiple"]): g for g in pooled})
    print(f"results in {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from writesae.demo import run_demo

    run_demo(model_name=args.model, out_dir=args.out, layer=args.layer, head=args.head, seed=args.seed, input=args.input,
             threads=args.threads or None)


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("model", help="hub id, local directory, or shipped name (stdlib:qwen3.5, stdlib:mamba2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, ...)")
    p.add_argument("--seed", type=int, default=0)


def _tokens_args(p: argparse.ArgumentParser, sequences: int, seq_len: int) -> None:
    p.add_argument("--tokens", default="stdlib", help="stdlib | PATH | hf:DATASET | random (see writesae.tokens)")
    p.add_argument("--sequences", type=int, default=sequences)
    p.add_argument("--seq-len", type=int, default=seq_len)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="writesae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="capture states or writes of (layer, head) cells into a store")
    _common(p)
    _tokens_args(p, 256, 128)
    p.add_argument("--layer", type=int, nargs="+", required=True)
    p.add_argument("--heads", type=int, nargs="+", default=None)
    p.add_argument("--kind", choices=["state", "write"], default="state")
    p.add_argument("--positions-per-sequence", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--store-dtype", default="float32")
    p.add_argument("--center", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train a WriteSAE on one cell of a store")
    p.add_argument("store")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--variant", default="bilinear", choices=["bilinear", "flat", "matrix", "bilinear_tied"])
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--sparsity", default="topk", choices=["topk", "batchtopk"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--input-scaling", default="none", choices=["none", "unit_mean_square"],
                   help="train on the data scaled to unit mean square (folded back at the end); "
                        "'none' is the paper's recipe")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("substitution", help="the substitution test (paper section 3)")
    _common(p)
    _tokens_args(p, 32, 128)
    p.add_argument("--sae", required=True)
    p.add_argument("--scale", choices=["activation", "matched_norm"])
    p.add_argument("--substitute", choices=["dominant", "firing"])
    p.add_argument("--kl-direction", dest="kl_direction", choices=["edited||base", "base||edited"])
    p.add_argument("--write", choices=["native", "delta"])
    p.add_argument("--max-firings-per-atom", dest="max_firings_per_atom", type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_substitution)

    p = sub.add_parser("logit-shift", help="the closed-form logit shift (paper section 4)")
    _common(p)
    _tokens_args(p, 16, 128)
    p.add_argument("--sae", required=True)
    p.add_argument("--path", choices=["out_proj", "jacobian"])
    p.add_argument("--n-atoms", dest="n_atoms", type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_logit_shift)

    p = sub.add_parser("install", help="installs during generation (paper section 5.3)")
    _common(p)
    _tokens_args(p, 8, 64)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True)
    p.add_argument("--new-tokens", dest="new_tokens", type=int)
    p.add_argument("--key", choices=["native", "query"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("demo", help="the whole pipeline offline on a shipped model, with headline figures")
    p.add_argument("--model", default="stdlib:qwen3.5", help="stdlib:qwen3.5 (default) or stdlib:mamba2, or any model")
    p.add_argument("--input", choices=["write", "state"], default="write", help="train the SAE on writes or states")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--head", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"writesae {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
