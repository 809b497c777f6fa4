"""``writesae families``: SAE families trained at a matched budget, val MSE and win rate each (paper Tables 5, 7)."""

from __future__ import annotations

import argparse

from writesae.cli import common, options
from writesae.cli.substitution import add_substitution_options

NAME = "families"
HELP = ("SAE families (flat, matrix, bilinear, tied, bilinear-flat; topk, batchtopk, jumprelu, gated) trained on one "
        "cell at a matched budget: validation MSE and substitution win rate per family "
        "(paper Tables 5, 7, Fig. 8)")  # fmt: skip
RESUME_NOTE = "finished SAEs are kept and a stopped training continues from its checkpoint; the store continues too"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_token_options(p, sequences=32, seq_len=128)
    p.add_argument("--store", type=options.store_dir,
                   help="a store holding the cell (default: collect one from --tokens)")
    p.add_argument("--layer", type=options.nonnegative_int, help="the cell's layer (needed without --store)")
    p.add_argument("--head", type=options.nonnegative_int, help="the cell's head (needed without --store)")
    p.add_argument("--train-sequences", dest="train_sequences", type=options.positive_int, default=256,
                   help="training-split sequences collected when no --store is given")  # fmt: skip
    # dest differs from the name: SubstitutionConfig.variants (its scale/atom variants) reads args.variants
    p.add_argument("--variants", dest="sae_variants", nargs="+",
                   choices=["bilinear", "flat", "matrix", "bilinear_tied", "bilinear_flat"],
                   help="families (default: all five)")  # fmt: skip
    p.add_argument("--sparsities", nargs="+", choices=["topk", "batchtopk", "jumprelu", "gated"],
                   help="sparsity kinds (default: topk; jumprelu and gated ignore --k)")  # fmt: skip
    p.add_argument("--sparsity-variants", dest="sparsity_variants", nargs="+",
                   choices=["bilinear", "flat", "matrix", "bilinear_tied", "bilinear_flat"],
                   help="the families trained under every --sparsities; the others under the first only (default: "
                        "all; the paper's Table 5 compares sparsities on bilinear alone)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 42)")
    p.add_argument("--d-sae", dest="d_sae", type=options.positive_int, help="atoms (default: 2048)")
    p.add_argument("--k", type=options.positive_int, help="active atoms per sample (default: 32)")
    p.add_argument("--epochs", type=options.positive_int, help="epochs (default: 20)")
    p.add_argument("--budget", choices=["n_features", "parameters"],
                   help="same d_sae for every family (default, Table 7) or the same parameter count")  # fmt: skip
    p.add_argument("--flat-svd-of", dest="flat_svd_of", choices=["reconstruction", "atom", "none"],
                   help="how dense atoms (flat, bilinear_flat) are substituted "
                        "(default: reconstruction, Table 6)")  # fmt: skip
    p.add_argument("--lr", type=options.positive_float, help="peak learning rate (default: 3e-4)")
    p.add_argument("--batch-size", dest="batch_size", type=options.positive_int, help="batch size (default: 256)")
    p.add_argument("--input-scaling", dest="input_scaling", choices=["none", "unit_mean_square"],
                   help="train on data scaled to unit mean square (default: none, the paper's)")  # fmt: skip
    options.add_sparsity_options(p)
    p.add_argument("--no-substitution", dest="no_substitution", action="store_true", help="validation MSE only")
    add_substitution_options(p)
    options.add_output_options(p, "families run")


def run(args: argparse.Namespace) -> None:
    from writesae.protocols.families import FamiliesConfig, run_families
    from writesae.protocols.substitution import SubstitutionConfig
    from writesae.tokens import token_blocks

    if args.store is None and (args.layer is None or args.head is None):
        raise ValueError("writesae families: give --store, or --layer and --head to collect a store from --tokens")
    names = ("sparsities", "sparsity_variants", "seeds", "d_sae", "k", "epochs", "budget", "flat_svd_of")
    sizes = {"variants": args.sae_variants, **{k: getattr(args, k) for k in names}}
    trainer = {k: getattr(args, k) for k in ("lr", "batch_size", "input_scaling") if getattr(args, k) is not None}
    trainer.update(options.sparsity_settings(args, args.sparsities or ["topk"]))
    config = FamiliesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items() if v is not None},
                            trainer=trainer,
                            substitution=None if args.no_substitution else
                            common.protocol_config(SubstitutionConfig, args))  # fmt: skip
    mode = options.output_mode(args)
    model = common.load_model(args)
    tokens = common.token_blocks(model, args)
    train_tokens = None
    if args.store is None:
        train_tokens = token_blocks(model, args.tokens, split="train", n_sequences=args.train_sequences,
                                    seq_len=args.seq_len, seed=options.token_seed(args)).to(model.cfg.device)  # fmt: skip
    result = run_families(model, tokens, store=args.store, train_tokens=train_tokens, layer=args.layer, head=args.head,
                          config=config, out_dir=args.out, mode=mode, device=str(model.cfg.device))  # fmt: skip
    common.print_json("families run", result.summary["headline"])
    print(f"results in {result.out_dir}")
