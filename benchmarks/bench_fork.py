"""Forking: many edits at position t from one prefix, against running each condition from scratch.

Prints, from one run (targets in brackets), for N conditions (write edits of one head at t):

1. read at t only:   N from-scratch runs of tokens[:, :t+1]  / fork(until=t+1)     [>= 20x]
2. to the end:       N from-scratch runs of tokens            / fork(to the end)    [>= 1.5x]
3. peak memory of each (above the pre-call level), and the largest difference between the fork's
   logits and the from-scratch logits (they must agree).

Usage::

    python benchmarks/bench_fork.py                       # Qwen3.5 of realistic width, N=32, t=512, T=1024
    python benchmarks/bench_fork.py --arch mamba2 --conditions 8 --length 256 --position 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hooks import _reset_peak_rss, _status_bytes, build_hf  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from hooked_recurrent.edits import scale_writes  # noqa: E402
from hooked_recurrent.fork import fork  # noqa: E402


def measured(fn, device: str):
    """(result, seconds, extra peak bytes) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
    return result, seconds, peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["qwen3.5", "mamba2"], default="qwen3.5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--conditions", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--position", type=int, default=512)
    args = parser.parse_args()

    model = HookedRecurrentModel(build_hf(args.arch, getattr(torch, args.dtype), args.layers)).to(args.device)
    cfg = model.cfg
    layer = cfg.recurrent_layers[len(cfg.recurrent_layers) // 2]
    t, n = args.position, args.conditions
    tokens = torch.randint(0, cfg.d_vocab, (1, args.length), device=args.device)
    factors = torch.linspace(-3, 3, n).tolist()
    # Condition i rescales head (i mod heads)'s write at t, through the cheap per-head hook point.
    conditions = [
        [(cfg.hook_name(layer, f"heads.{i % cfg.n_heads}.hook_write"), scale_writes([t], f))]
        for i, f in enumerate(factors)
    ]

    def scratch(until: int) -> torch.Tensor:
        return torch.stack([model.run_with_hooks(tokens[:, :until], fwd_hooks=c)[:, t:until] for c in conditions])

    with torch.no_grad():
        model(tokens[:, :16])  # warm-up
        results = {}
        for label, until in (("read_at_t", t + 1), ("to_end", args.length)):
            forked, t_fork, m_fork = measured(lambda: fork(model, tokens, t, conditions, until=until), args.device)
            reference, t_scratch, m_scratch = measured(lambda: scratch(until), args.device)
            diff = (forked - reference).abs().max().item()
            results[label] = (t_scratch, t_fork, m_scratch, m_fork, diff)

    print(f"config: {vars(args)}; {cfg.architecture} d_model={cfg.d_model} heads={cfg.n_heads} d_k={cfg.d_k} d_v={cfg.d_v}")
    for label, (t_scratch, t_fork, m_scratch, m_fork, diff) in results.items():
        print(
            f"{label:10s} from scratch {t_scratch:8.2f} s   fork {t_fork:7.2f} s   speed-up {t_scratch / t_fork:6.1f}x   "
            f"peak +{m_scratch / 2**20:8.1f} MiB vs fork +{m_fork / 2**20:8.1f} MiB   max |logit diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
