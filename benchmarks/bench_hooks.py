"""Speed and memory of the hooked model against the plain HF model, measured in one run.

Prints ratios against a baseline timed in the same process (targets in brackets):

1. hooked forward, no hooks            / HF forward                     [<= 1.05]
2. capturing hook_write_key/value of one layer / hooked forward         [<= 1.10]
3. a write edit at 3 positions of one head / hooked forward             [<= 1.5]
4. recurrence alone: naive token loop / our edit path (3 edits)         [>= 3]
5. peak memory of capturing hook_state for one layer and one head vs all heads (printed)

Usage::

    python benchmarks/bench_hooks.py                  # Qwen3.5, d_k = d_v = 128, 16 heads, T = 1024
    python benchmarks/bench_hooks.py --arch mamba2    # Mamba-2, head_dim 64, d_state 128, 32 heads
    python benchmarks/bench_hooks.py --arch kimi_linear   # Kimi Delta Attention (decay per key channel), 16 x 128
    python benchmarks/bench_hooks.py --arch minimax   # MiniMax lightning attention (fixed decays), 8 heads x 128
    python benchmarks/bench_hooks.py --arch bamba     # Bamba (a Mamba-2 host): Mamba-2 widths, MLPs, 1 attention layer
    python benchmarks/bench_hooks.py --arch jamba     # Jamba (Mamba-1): 2048 channels of d_state 16, 1 attention layer
    python benchmarks/bench_hooks.py --device cuda --dtype bfloat16

The models have realistic widths but few layers and random weights; timings are medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time

import torch

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.recurrence import RecurrenceInputs, StepEdit, run_recurrence, step


DELTA_RULE = ("qwen3.5", "kimi_linear")  # the recurrences with an erase


def build_hf(arch: str, dtype: torch.dtype, layers: int):
    """A randomly initialised HF model of realistic width."""
    torch.manual_seed(0)
    if arch == "qwen3.5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        config = Qwen3_5TextConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
            linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
            full_attention_interval=4, tie_word_embeddings=True,
        )
        return Qwen3_5ForCausalLM(config).to(dtype).eval()
    if arch == "kimi_linear":
        from transformers import KimiLinearConfig, KimiLinearForCausalLM

        config = KimiLinearConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=512, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128, linear_num_heads=16, linear_head_dim=128,
            layer_types=["linear_attention"] * (layers - 1) + ["full_attention"],
            mlp_layer_types=["dense"] * layers, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )
        return KimiLinearForCausalLM(config).to(dtype).eval()
    if arch == "minimax":
        from transformers import MiniMaxConfig, MiniMaxForCausalLM

        config = MiniMaxConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=1792, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=2,
            num_experts_per_tok=1, layer_types=["linear_attention"] * (layers - 1) + ["full_attention"],
        )
        return MiniMaxForCausalLM(config).to(dtype).eval()
    if arch == "bamba":
        from transformers import BambaConfig, BambaForCausalLM

        config = BambaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
            attn_layer_indices=[layers // 2], num_attention_heads=8, num_key_value_heads=2, mamba_n_heads=32,
            mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_chunk_size=256,
        )
        return BambaForCausalLM(config).to(dtype).eval()
    if arch == "jamba":
        from transformers import JambaConfig, JambaForCausalLM

        config = JambaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
            attn_layer_period=layers, attn_layer_offset=layers // 2, num_experts=1, num_attention_heads=8,
            num_key_value_heads=2, mamba_d_state=16, mamba_expand=2,
        )
        return JambaForCausalLM(config).to(dtype).eval()
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        vocab_size=32000, hidden_size=1024, expand=2, num_heads=32, head_dim=64, state_size=128,
        n_groups=1, num_hidden_layers=layers, chunk_size=256,
    )
    return Mamba2ForCausalLM(config).to(dtype).eval()


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(variants: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each variant, timed in rounds (one call of each per round), so that a
    change in machine load hits every variant alike instead of biasing the ratios."""
    for fn in variants.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def speed(args: argparse.Namespace) -> dict[str, float]:
    dtype = getattr(torch, args.dtype)
    hf = build_hf(args.arch, dtype, args.layers).to(args.device)
    plain_hf = copy.deepcopy(hf)  # wrapping routes the original's forwards through hooks
    model = HookedRecurrentModel(hf).to(args.device)
    cfg = model.cfg
    layer = cfg.recurrent_layers[len(cfg.recurrent_layers) // 2]
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.length), device=args.device)
    head = cfg.n_heads // 2
    positions = [args.length // 5, args.length // 2, args.length - 7]

    def edit(writes, hook):
        writes[:, positions] *= 2.0

    factor_names = [cfg.hook_name(layer, "hook_write_key"), cfg.hook_name(layer, "hook_write_value")]
    variants = {
        "hf": lambda: plain_hf(input_ids=tokens),
        "hooked": lambda: model(tokens),
        "factors": lambda: model.run_with_cache(tokens, names_filter=factor_names),
        "edit": lambda: model.run_with_hooks(tokens, fwd_hooks=[(cfg.hook_name(layer, f"heads.{head}.hook_write"), edit)]),
        "edit_all_heads": lambda: model.run_with_hooks(
            tokens, fwd_hooks=[(cfg.hook_name(layer, "hook_write"), lambda w, hook: edit(w[:, :, head], hook))]
        ),
    }
    with torch.no_grad():
        times = interleaved(variants, args.repeats, args.device)
    t_hf, t_hooked, t_factors, t_edit, t_edit_all_heads = (times[k] for k in variants)
    return {
        "hf_forward_s": t_hf,
        "hooked_forward_s": t_hooked,
        "no_hooks_vs_hf": t_hooked / t_hf,
        "capture_write_factors_vs_plain": t_factors / t_hooked,
        "write_edit_3_positions_one_head_vs_plain": t_edit / t_hooked,
        "same_edit_through_all_head_hook_write_vs_plain": t_edit_all_heads / t_hooked,
    }


def recurrence_only(args: argparse.Namespace) -> dict[str, float]:
    """Naive token loop vs the edit path (chunked stretches split at 3 edited positions)."""
    lanes, length, d_k, d_v = args.batch * 16, args.length, 128, 128
    chunk_size = 64
    if args.arch in ("mamba2", "bamba"):
        lanes, d_k, d_v = args.batch * 32, 128, 64
    if args.arch == "minimax":
        lanes = args.batch * 8
    if args.arch == "jamba":  # one lane per channel, a decay per key channel, the mixer's token loop
        lanes, d_k, d_v, chunk_size = args.batch * 2048, 16, 1, 1
    g = torch.Generator().manual_seed(0)
    device = args.device

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    decay_shape = (lanes, length, d_k) if args.arch in ("kimi_linear", "jamba") else (lanes, length)
    inputs = RecurrenceInputs(
        query=rand(lanes, length, d_k) * d_k**-0.5,
        key=torch.nn.functional.normalize(rand(lanes, length, d_k), dim=-1),
        value=rand(lanes, length, d_v),
        log_decay=-torch.rand(*decay_shape, generator=g).to(device) * 0.1,
        erase=torch.rand(lanes, length, generator=g).to(device) if args.arch in DELTA_RULE else None,
    )
    initial = torch.zeros(lanes, d_k, d_v, device=device)
    lanes_mask = torch.zeros(lanes, dtype=torch.bool, device=device)
    lanes_mask[0] = True
    edits = {p: StepEdit(write=rand(lanes, d_k, d_v), write_lanes=lanes_mask) for p in (100, 500, 900) if p < length}

    def naive():
        state = initial
        for t in range(length):
            _, state = step(inputs, state, t, edits.get(t))
        return state

    def edit_path():
        return run_recurrence(inputs, initial, edits=edits, chunk_size=chunk_size).final_state

    with torch.no_grad():
        torch.testing.assert_close(naive(), edit_path(), rtol=1e-3, atol=1e-3)
        t_naive = timed(naive, max(1, args.repeats // 2), device)
        t_edit = timed(edit_path, args.repeats, device)
    return {"naive_loop_s": t_naive, "edit_path_s": t_edit, "naive_loop_vs_edit_path": t_naive / t_edit}


def _peak_memory_child(args: argparse.Namespace) -> None:
    """Run one configuration and print its peak memory (bytes) as JSON."""
    dtype = getattr(torch, args.dtype)
    model = HookedRecurrentModel(build_hf(args.arch, dtype, args.layers)).to(args.device)
    cfg = model.cfg
    layer = cfg.recurrent_layers[len(cfg.recurrent_layers) // 2]
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.length), device=args.device)
    names = {
        "plain": None,
        "one_head": [cfg.hook_name(layer, "heads.0.hook_state")],
        "all_heads": [cfg.hook_name(layer, "hook_state")],
    }[args.memory_case]
    with torch.no_grad():
        model(tokens[:, :8])  # allocate lazily created buffers before measuring
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()
    with torch.no_grad():
        if names is None:
            model(tokens)
        else:
            _, cache = model.run_with_cache(tokens, names_filter=names)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _status_bytes("VmHWM")
    print(json.dumps({"extra_peak_bytes": peak - before}))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the process's peak-RSS counter (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_bytes("VmRSS")


def memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak memory above the pre-forward level, each case in a fresh process."""
    extra = {}
    for case in ("plain", "one_head", "all_heads"):
        cmd = [sys.executable, __file__, "--memory-case", case] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "memory_case"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        extra[case] = json.loads(out)["extra_peak_bytes"]
    return {
        "forward_peak_plain_MiB": extra["plain"] / 2**20,
        "forward_peak_caching_state_one_head_MiB": extra["one_head"] / 2**20,
        "forward_peak_caching_state_all_heads_MiB": extra["all_heads"] / 2**20,
        "state_all_heads_vs_one_head_peak": extra["all_heads"] / max(extra["one_head"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    archs = ["qwen3.5", "mamba2", "kimi_linear", "minimax", "bamba", "jamba"]
    parser.add_argument("--arch", choices=archs, default="qwen3.5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        _peak_memory_child(args)
        return
    results = {"config": {k: v for k, v in vars(args).items() if k != "memory_case"}}
    results.update(speed(args))
    results.update(recurrence_only(args))
    results.update(memory(args))
    for key, value in results.items():
        print(f"{key:52s} {value:.4g}" if isinstance(value, float) else f"{key:52s} {value}")


if __name__ == "__main__":
    main()
