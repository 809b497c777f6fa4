"""``writesae dashboard SAE --model M --tokens SOURCE --out DIR``: feature dashboards of a WriteSAE's atoms.

Writes ``DIR/index.html`` (open it in a browser, offline), ``DIR/dashboard.json`` (the data, for
`writesae.dashboard.DashboardData.load`) and ``DIR/neuronpedia/`` (the batch files Neuronpedia
imports; see `writesae.dashboard.neuronpedia`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from writesae.cli import common, options

NAME = "dashboard"
HELP = "feature dashboards of a WriteSAE's atoms (one HTML file, notebook data, a Neuronpedia export)"
RESUME_NOTE = "a finished dashboard is kept; an unfinished one starts again, as it keeps no partial results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", type=options.sae_dir, help="a saved SAE folder (writesae train: OUT/sae)")
    p.add_argument("--model", type=options.model_name, default=None,
                   help="the model the SAE was trained on (default: the SAE's metadata.model_name)")  # fmt: skip
    options.add_model_options(p, positional=False)
    options.add_token_options(p, sequences=256, seq_len=128)
    p.add_argument("--runs", type=Path, nargs="*", default=[],
                   help="substitution / logit-shift run folders of this SAE, for their per-atom figures")  # fmt: skip
    p.add_argument("--contexts", type=options.positive_int, default=10, help="top firing contexts kept per atom")
    p.add_argument("--batch-size", dest="batch_size", type=options.positive_int, default=8, help="token blocks per forward pass")
    p.add_argument("--no-linear-response", dest="linear_response", action="store_false",
                   help="skip the exact linear response of each atom's top firing (one forward-mode pass per atom)")  # fmt: skip
    p.add_argument("--response-atoms", dest="response_atoms", type=options.positive_int, default=None,
                   help="compute the linear response for this many atoms, most frequent first (default: all)")  # fmt: skip
    options.add_output_options(p, "dashboard")


def run(args: argparse.Namespace) -> None:
    from writesae.dashboard import DashboardConfig, build_dashboard, write_dashboard

    out = common.restartable_out_dir(args, "dashboard", finished="index.html")
    if out is None:
        return
    if args.model is None:
        args.model = _trained_on(args.sae)
    model = common.load_model(args)
    sae = common.load_sae(args.sae, model)
    config = DashboardConfig(contexts=args.contexts, batch_size=args.batch_size, linear_response=args.linear_response,
                             response_atoms=args.response_atoms)  # fmt: skip
    data = build_dashboard(model, sae, common.token_blocks(model, args), config=config, runs=args.runs,
                           name=str(args.sae), source=args.tokens)  # fmt: skip
    page = write_dashboard(data, out)["html"]
    print(f"{data.meta['n_alive']} of {data.meta['d_sae']} atoms fired on {data.meta['n_positions']:,} positions; "
          f"dashboard {page} ({page.stat().st_size / 1e6:.2f} MB); data and Neuronpedia export beside it")  # fmt: skip


def _trained_on(sae_dir: Path) -> str:
    """The model a saved SAE records in its ``cfg.json`` (``metadata.model_name``)."""
    name = json.loads((sae_dir / "cfg.json").read_text()).get("metadata", {}).get("model_name")
    if not name:
        raise ValueError(f"{sae_dir}/cfg.json does not name the model it was trained on (metadata.model_name): pass --model")
    return options.model_name(name)
