"""WriteSAE speed against dense baselines, measured in one process.

Prints, at the paper's size by default (d_k = d_v = 128, d_sae = 2048, k = 32):

1. Encoding rank-1 writes: ``encode((key, value))`` (factor form, bilinear score (v.k)(u.w)) versus
   ``encode(key value^T)`` on the same writes already stored as dense matrices. Ratio target >= 10x.
2. Training throughput, samples/s: one full optimiser step of ``WriteSAETrainer`` (bilinear WriteSAE,
   writes in factor form, paper recipe) versus one step of SAELens' own ``SAETrainer`` with a
   ``TopKTrainingSAE`` on the flattened ``d_k * d_v`` writes (batches prepared beforehand, so the
   baseline does not pay for building them). Measured twice: with no dead atoms (AuxK idle) and with
   every atom counted dead (AuxK active in both: ours k_aux = 256, SAELens' k_aux = d_in / 2 capped at
   the number of dead latents). Ratio target >= 3x.
3. Bytes on disk per token of the activation store: reported once the store exists.

Usage: python benchmarks/bench_writesae.py [--steps 10] [--threads N] [--d-k 128 ...]

OpenMP threads spin while they wait for each other (``OMP_WAIT_POLICY=ACTIVE`` behaviour); on a
machine with more runnable threads than cores every parallel op then waits for a descheduled thread,
which on the shared 2-core development box made a WriteSAE step 15x slower with 2 threads than with
1. The script therefore sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it; it applies to
both sides alike, and the header prints it with the load average.
"""

from __future__ import annotations

import os

# Must be set before torch (and its OpenMP runtime) loads; see the module docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_encode(args: argparse.Namespace) -> None:
    from writesae import WriteSAE, WriteSAEConfig

    torch.manual_seed(args.seed)
    sae = WriteSAE(WriteSAEConfig.build(d_k=args.d_k, d_v=args.d_v, d_sae=args.d_sae, k=args.k)).eval()
    key, value = torch.randn(args.encode_batch, args.d_k), torch.randn(args.encode_batch, args.d_v)
    dense = key[:, :, None] * value[:, None, :]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode((key, value)), sae.encode(dense), rtol=1e-4, atol=1e-4)
        t_factor = timed(lambda: sae.encode((key, value)), args.repeats, 2)
        t_dense = timed(lambda: sae.encode(dense), args.repeats, 2)
    n = args.encode_batch
    print(f"[1] encode {n} rank-1 writes (bilinear, k={args.k}):")
    print(f"    factor pairs : {t_factor * 1e3:9.2f} ms  ({n / t_factor:12.0f} writes/s)")
    print(f"    dense [d_k,d_v]: {t_dense * 1e3:7.2f} ms  ({n / t_dense:12.0f} writes/s)")
    print(f"    ratio        : {t_dense / t_factor:9.1f}x  (target >= 10x)")


def bench_training(args: argparse.Namespace) -> None:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from writesae import (
        FactorSource,
        TrainerConfig,
        WriteSAETrainer,
        WriteTrainingSAE,
        WriteTrainingSAEConfig,
    )

    d_in, bs = args.d_k * args.d_v, args.batch
    torch.manual_seed(args.seed)
    keys = torch.randn(bs * 4, args.d_k) / args.d_k**0.5
    values = torch.randn(bs * 4, args.d_v) / args.d_v**0.5
    batches = [(keys[i : i + bs], values[i : i + bs]) for i in range(0, bs * 4, bs)]
    flat_batches = [(k[:, :, None] * v[:, None, :]).reshape(bs, d_in) for k, v in batches]

    ours = WriteTrainingSAE(
        WriteTrainingSAEConfig.build(d_k=args.d_k, d_v=args.d_v, d_sae=args.d_sae, k=args.k)
    )
    total = 10**6  # schedule length only; we time individual steps
    trainer = WriteSAETrainer(
        ours, FactorSource(keys, values), TrainerConfig(batch_size=bs, max_samples=total * bs, progress=False)
    )
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k))
    st = SAETrainer(
        SAETrainerConfig(total_training_samples=total * bs, train_batch_size_samples=bs, lr_end=3e-5),
        theirs,
        iter(()),
    )

    counter = {"ours": 0, "theirs": 0}

    def our_step() -> None:
        trainer.train_step(batches[counter["ours"] % 4])
        counter["ours"] += 1

    def their_step() -> None:
        st.step(flat_batches[counter["theirs"] % 4])
        st.n_training_steps += 1
        counter["theirs"] += 1

    print(f"[2] training throughput, batch {bs}, d_in {d_in}, d_sae {args.d_sae}, k {args.k}:")
    for label, all_dead in (("no dead atoms (AuxK idle)", False), ("all atoms dead (AuxK on)", True)):
        if all_dead:
            trainer.steps_since_active.fill_(10**6)
            trainer.cfg.resample_every = None  # keep them dead: we time the AuxK cost, not resampling
            trainer.cfg.dead_steps = 0
            st.cfg.dead_feature_window = -1
        t_ours = timed(our_step, args.steps, args.warmup)
        t_theirs = timed(their_step, args.steps, args.warmup)
        print(f"    {label}:")
        print(f"      WriteSAE, factor-form writes : {bs / t_ours:10.0f} samples/s ({t_ours * 1e3:8.1f} ms/step)")
        print(f"      SAELens TopK, flat d_in      : {bs / t_theirs:10.0f} samples/s ({t_theirs * 1e3:8.1f} ms/step)")
        print(f"      ratio                        : {t_theirs / t_ours:10.1f}x  (target >= 3x)")


def bench_store(args: argparse.Namespace) -> None:
    """Bytes on disk per captured token and head: writes as factor pairs vs states."""
    import tempfile

    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from hooked_recurrent import HookedRecurrentModel
    from writesae.store import collect

    torch.manual_seed(args.seed)
    config = Qwen3_5TextConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=args.d_k, linear_value_head_dim=args.d_v,
    )
    model = HookedRecurrentModel(Qwen3_5ForCausalLM(config).eval())
    tokens = torch.randint(0, 1024, (8, 128))
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("write", "state"):
            store = collect(model, tokens, layers=[0], heads=[0], kind=kind, out_dir=f"{tmp}/{kind}", verbose=False)
            sizes[kind] = store.bytes_per_sample(0, 0)
    print(f"[3] bytes on disk per token and head (float32, shards incl. sequence/position indices):")
    print(f"    writes (factor pairs) : {sizes['write']:10.0f} B")
    print(f"    states                : {sizes['state']:10.0f} B")
    print(f"    ratio                 : {sizes['state'] / sizes['write']:10.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-k", type=int, default=128)
    parser.add_argument("--d-v", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--encode-batch", type=int, default=1024, help="writes per encode call")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=10, help="timed encode calls")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {load}")  # fmt: skip
    print(f"d_k={args.d_k} d_v={args.d_v} d_sae={args.d_sae} k={args.k}")
    bench_encode(args)
    bench_training(args)
    bench_store(args)


if __name__ == "__main__":
    main()
