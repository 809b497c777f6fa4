"""Dashboard memory and time: the streaming scan against holding every activation, in one run.

For each size (tokens scanned), a fresh process builds the dashboard data of a 2,048-atom WriteSAE
(k = 32, random factors: every atom fires) on one head of the shipped ``stdlib:qwen3.5``, and reports
its peak resident memory above what the model and SAE alone take, and its time:

- streaming: `writesae.dashboard.build_dashboard` (running top-k, histograms; memory set by the batch);
- baseline: the direct way (the tutorials' way on small data): run the batches, keep every code and
  every query score, then sort each atom's column. Its memory grows with the tokens; it runs up to
  ``--baseline-max`` tokens and is reported as "not run" beyond (with the memory it would need).

The streaming side is `build_dashboard` whole (scan, factor readouts, records); it then renders the
HTML page, whose size is printed. At the smallest size both must find the same top activations
(checked). The linear response (one pass per atom, independent of
the number of tokens) is left out: ``--no-linear-response`` in the command.

Usage: python benchmarks/bench_dashboard.py [--sizes 32768 131072 1048576] [--baseline-max 131072]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_writesae.py: spinning threads on a shared box

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

LAYER, HEAD = 2, 3  # the shipped model's longest-memory head


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args: argparse.Namespace):
    import writesae  # noqa: F401
    from hooked_recurrent import HookedRecurrentModel
    from writesae import WriteSAE, WriteSAEConfig

    model = HookedRecurrentModel.from_pretrained("stdlib:qwen3.5")
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=args.d_sae, k=args.k)
    cfg.metadata.hook_name = model.cfg.hook_name(LAYER, "hook_write")
    cfg.metadata.hook_head_index = HEAD
    cfg.metadata.model_name = model.cfg.model_name
    sae = WriteSAE(cfg, seed=0).eval()
    rows = args.tokens // args.seq_len
    tokens = torch.randint(0, model.cfg.d_vocab, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    return model, sae, tokens


@torch.no_grad()
def baseline(model, sae, tokens, args):
    """Hold every code and retrieval score, then take each atom's top-k and counts."""
    from writesae.dashboard.scan import retrieval_scores
    from writesae.protocols.cell import encode_trace, sae_cell, trace_cell

    cell, kind = sae_cell(model, sae)
    key_f, value_f = sae.atom_key.float(), sae.atom_value.float()
    codes, scores = [], []
    for start in range(0, tokens.shape[0], args.batch_size):
        trace = trace_cell(model, tokens[start : start + args.batch_size], cell)
        c = encode_trace(sae, trace, kind).float()
        c[:, :1] = 0  # skip_first, as the scan
        codes.append(c)
        scores.append(retrieval_scores(trace.query.reshape(-1, key_f.shape[-1]), key_f, value_f @ value_f.transpose(1, 2)))
    codes = torch.cat(codes).flatten(0, 1)  # [positions, d_sae]
    scores = torch.cat(scores)
    count = (codes > 0).sum(0)
    top = codes.topk(args.contexts, dim=0).values.T  # [d_sae, contexts]
    _queries = scores.topk(5, dim=0)  # the retrieving queries, as the dashboard keeps them
    return {str(a): [v for v in top[a, :3].tolist() if v > 0] for a in range(64) if count[a] > 0}


def worker(args: argparse.Namespace) -> None:
    model, sae, tokens = setup(args)
    before = peak_rss_mb()
    start = time.perf_counter()
    if args.worker == "streaming":
        from writesae.dashboard import DashboardConfig, build_dashboard, render_page

        config = DashboardConfig(contexts=args.contexts, batch_size=args.batch_size, linear_response=False)
        data = build_dashboard(model, sae, tokens, config=config, source="random", verbose=False)
        seconds = time.perf_counter() - start
        page = render_page(data)
        top = {str(r.index): [c.value for c in r.contexts[:3]] for r in data.atoms if r.index < 64}
        result = {"html_bytes": len(page.encode()), "n_alive": len(data.atoms), "top": top}
    else:
        top = baseline(model, sae, tokens, args)
        seconds = time.perf_counter() - start
        result = {"top": top}
    result.update(seconds=seconds, extra_mb=peak_rss_mb() - before)
    print(json.dumps(result))


def run(kind: str, tokens: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--tokens", str(tokens), "--d-sae", str(args.d_sae),
               "--k", str(args.k), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--contexts", str(args.contexts)]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072, 1048576], help="tokens scanned")
    parser.add_argument("--baseline-max", type=int, default=131072, help="largest size the baseline runs at")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--contexts", type=int, default=10)
    parser.add_argument("--worker", choices=["streaming", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        worker(args)
        return
    print(f"dashboard scan, d_sae={args.d_sae}, k={args.k}, stdlib:qwen3.5 L{LAYER} H{HEAD} writes, "
          f"{args.seq_len}-token rows, batch {args.batch_size}, 1 thread; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'tokens':>9} | {'streaming s':>11} {'extra MB':>9} {'HTML MB':>8} | {'baseline s':>10} {'extra MB':>9} | memory ratio")
    for i, tokens in enumerate(sorted(args.sizes)):
        stream = run("streaming", tokens, args)
        line = f"{tokens:>9} | {stream['seconds']:>11.1f} {stream['extra_mb']:>9.0f} {stream['html_bytes'] / 1e6:>8.2f} | "
        if tokens <= args.baseline_max:
            base = run("baseline", tokens, args)
            if i == 0:  # both must find the same atoms and top activations
                assert stream["top"].keys() == base["top"].keys()
                for atom, values in stream["top"].items():
                    torch.testing.assert_close(torch.tensor(values), torch.tensor(base["top"][atom]), rtol=1e-4, atol=1e-7)
            line += f"{base['seconds']:>10.1f} {base['extra_mb']:>9.0f} | {base['extra_mb'] / max(stream['extra_mb'], 1):.1f}x"
        else:
            need = tokens * args.d_sae * 4 * 2 / 1e6  # codes and retrieval scores, float32
            line += f"{'not run':>10} {'>' + format(need, '.0f'):>9} | (would hold every code and score)"
        print(line, flush=True)
    print(f"alive atoms at the largest size: {stream['n_alive']} of {args.d_sae}")


if __name__ == "__main__":
    main()
