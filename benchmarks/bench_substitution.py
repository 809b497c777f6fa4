"""Substitution test: walking the sequences once against recomputing every firing's prefix.

The substitution test edits a sequence at every firing. What `run_substitution` does: walk the
sequences once, together (one cache advanced from firing position to firing position, and every
condition of every sequence that fires there forked in one batched pass), against what it did
before: each firing alone, its prefix recomputed, then its conditions forked
(``recompute_prefixes=True, sequences_per_unit=1``). Same firings (the command line's defaults: every
atom that fires, at most 30 firings each), same process. Prints both times (CPU time is the fair
measure on a shared machine), the speed-up (target >= 10x on 8 x 128 tokens of a realistic-width
model) and the largest difference between the two runs' KLs (they must agree).

Usage::

    python benchmarks/bench_substitution.py                     # Qwen3.5 of realistic width, 8 x 128 tokens, all variants
    python benchmarks/bench_substitution.py --headline-only     # the paper's three conditions per firing
    python benchmarks/bench_substitution.py --arch mamba2 --sequences 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hooks import build_hf  # noqa: E402

import writesae  # noqa: E402, F401
from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from writesae import WriteSAE, WriteSAEConfig  # noqa: E402
from writesae.protocols.run import run_protocol  # noqa: E402
from writesae.protocols.substitution import VARIANTS, SubstitutionConfig, SubstitutionTest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["qwen3.5", "mamba2"], default="qwen3.5")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=2, help="atoms active per position (so firings per position)")
    parser.add_argument("--atoms", type=int, default=None, help="test only the most frequent atoms (default: all that fire)")
    parser.add_argument("--firings-per-atom", type=int, default=30, help="the paper's cap (the command line's default)")
    parser.add_argument("--headline-only", action="store_true",
                        help="measure the headline variant only (the paper's three conditions per firing), not all four")
    parser.add_argument("--threads", type=int, default=1, help="1: CPU time then measures the work (see the output)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = HookedRecurrentModel(build_hf(args.arch, torch.float32, args.layers), model_name=f"bench-{args.arch}")
    cfg = model.cfg
    params = sum(p.numel() for p in model.hf_model.parameters())
    layer = cfg.recurrent_layers[-1]
    sae_cfg = WriteSAEConfig.build(d_k=cfg.d_k, d_v=cfg.d_v, d_sae=args.d_sae, k=args.k)
    sae_cfg.metadata.hook_name = cfg.hook_name(layer, "hook_state")
    sae_cfg.metadata.hook_head_index = 0
    sae_cfg.metadata.model_name = cfg.model_name
    sae = WriteSAE(sae_cfg, seed=0)
    tokens = torch.randint(0, cfg.d_vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = SubstitutionConfig(n_atoms=args.atoms, max_firings_per_atom=args.firings_per_atom, n_bootstrap=100,
                                n_permutations=100, variants=() if args.headline_only else VARIANTS)  # fmt: skip

    walked = SubstitutionTest(model, sae, tokens, config=config)
    alone = SubstitutionConfig(**{**vars(config), "sequences_per_unit": 1})
    recomputed = SubstitutionTest(model, sae, tokens, config=alone, firings=walked.firings, recompute_prefixes=True)
    positions = len({(f.sequence, f.position) for f in walked.firings})
    print(f"{args.arch}: {params / 1e6:.1f}M parameters, {args.sequences} x {args.seq_len} tokens; SAE on L{layer} H0 states, "
          f"{len(walked.firings)} firings at {positions} positions, {len(config.measured)} variant(s) each, {args.threads} thread(s)")  # fmt: skip
    wall, cpu, records = {}, {}, {}
    for name, protocol in (("walk the sequences once", walked), ("recompute every prefix", recomputed)):
        start, start_cpu = time.perf_counter(), time.process_time()
        records[name] = run_protocol(protocol, verbose=False).records
        wall[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
        print(f"  {name:26s} {wall[name]:8.1f} s wall, {cpu[name]:8.1f} s CPU")
    a, b = records.values()
    largest = max(abs(x.kl_atom[v] - y.kl_atom[v]) / max(abs(y.kl_atom[v]), 1e-12) for x, y in zip(a, b) for v in x.kl_atom)
    walk, recompute = "walk the sequences once", "recompute every prefix"
    # CPU time is the fair measure on a machine shared with other jobs (both runs are single-process).
    print(f"speed-up {cpu[recompute] / cpu[walk]:.1f}x in CPU time, {wall[recompute] / wall[walk]:.1f}x in wall time "
          f"(target >= 10x); largest relative KL difference between the two {largest:.1e}")


if __name__ == "__main__":
    main()
