"""Trains a small Qwen3.5 or Mamba-2 language model on the stdlib corpus.

The shipped models were made with exactly these commands, from the repository
root, on a 2-core CPU machine (CPython 3.11.7, torch 2.13 CPU, transformers
5.24, tokenizers 0.23)::

    python -m hooked_recurrent.pretrained.train --arch qwen3.5 \\
        --out hooked_recurrent/pretrained/stdlib-qwen3.5 --checkpoint-dir runs/stdlib-qwen3.5
    python -m hooked_recurrent.pretrained.train --arch mamba2 \\
        --out hooked_recurrent/pretrained/stdlib-mamba2 --checkpoint-dir runs/stdlib-mamba2

Running a command again on the same machine and software gives the same
weights: every random choice is seeded, the data order is a function of the
seed and the step, and the thread count is fixed (``--threads``, default 2,
because floating-point reductions may split differently with more threads).
A different Python version gives a different corpus, and so different weights.

An interrupted run continues with the same command plus ``--resume``; the
resume checkpoint (model, AdamW state, step, data position and RNG states, in
one safetensors file) is written every ``--checkpoint-every`` steps, and a
resumed run ends with the same weights as an uninterrupted one.
``--stop-after N`` stops after step N as if interrupted, to test exactly that.

The output folder loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` and holds ``training_record.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import tokenizers
import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from hooked_recurrent.pretrained import checkpoint, corpus, data, evaluation, heldout
from hooked_recurrent.pretrained.configs import ARCHS, PRESETS, build_config, config_summary
from hooked_recurrent.pretrained.schedule import learning_rate
from hooked_recurrent.pretrained.tokenizer import token_byte_lengths, train_tokenizer

# Arguments that change the trained weights; a resumed run must match them.
_WEIGHT_ARGS = (
    "arch", "seed", "steps", "lr", "warmup", "min_lr_ratio", "batch_size", "seq_len", "weight_decay",
    "beta1", "beta2", "grad_clip", "vocab_size", "val_fraction", "threads",
)
_SAMPLE_PROMPT = "def __init__(self"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; unset presets are filled in from the arch."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--out", type=pathlib.Path, required=True, help="model folder to write")
    p.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                   help="where the resume checkpoint goes (default: runs/<name of --out>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: arch preset)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: arch preset)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of peak")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=32, help="windows in each periodic validation")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="windows per validation forward (default: --batch-size; does not change the weights)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    p.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this step")
    args = p.parse_args(argv)
    preset = PRESETS[args.arch]
    args.steps = preset.steps if args.steps is None else args.steps
    args.lr = preset.lr if args.lr is None else args.lr
    args.warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    if args.checkpoint_dir is None:
        args.checkpoint_dir = pathlib.Path("runs") / args.out.name
    return args


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_state() -> dict:
    """The commit of this code and whether its Python files have local edits."""
    here = pathlib.Path(__file__).parent

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", ".")
    dirty = None if status is None else any(line.endswith(".py") for line in status.splitlines())
    return {"commit": git("rev-parse", "HEAD"), "code_dirty": dirty}


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, A_log, dt_bias)."""
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the plain per-parameter loop, the same code path on any build.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), foreach=False)


def greedy_sample(model, tokenizer, prompt: str = _SAMPLE_PROMPT, new_tokens: int = 60) -> str:
    """Greedy continuation of ``prompt``, decoded, prompt included."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0])


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Moves every file of ``tmp`` into ``out``, each with an atomic replace."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(tmp.iterdir()):
        path.chmod(0o644)  # some writers create 0600 temporaries; shipped files must be readable
        os.replace(path, out / path.name)


def main(argv: list[str] | None = None) -> dict:
    """Runs (or resumes) one training run; returns the training record."""
    t_start = time.time()
    args = parse_args(argv)
    command = "python -m hooked_recurrent.pretrained.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    ckpt_path = args.checkpoint_dir / "resume.safetensors"

    files = corpus.list_source_files()
    train_files, val_files = corpus.split_files(files, args.val_fraction)
    if heldout.SAMPLE_SOURCE in {f.relpath for f in train_files}:
        raise RuntimeError("the shipped held-out sample would be in the training split")
    tokenizer = train_tokenizer([f.text for f in train_files], vocab_size=args.vocab_size)
    train_stream = data.encode_stream(tokenizer, train_files)
    val_windows = data.to_windows(data.encode_stream(tokenizer, val_files), args.seq_len)
    sampler = data.WindowSampler(data.to_windows(train_stream, args.seq_len), args.batch_size, args.seed)
    byte_lengths = np.asarray(token_byte_lengths(tokenizer))
    eval_batch = args.eval_batch_size or args.batch_size
    probe = np.linspace(0, len(val_windows) - 1, min(args.eval_windows, len(val_windows))).astype(int)

    config = build_config(args.arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(args.seed)  # the init depends on the seed only, not on the work above
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = make_optimizer(model, args)

    hparams = {k: getattr(args, k) for k in _WEIGHT_ARGS}
    fingerprint = corpus.corpus_fingerprint(files)
    state = {"step": 0, "position": [0, 0], "hparams": hparams, "corpus_fingerprint": fingerprint,
             "val_curve": [], "train_loss_ema": None, "train_seconds": 0.0, "wall_seconds": 0.0, "commands": []}
    if args.resume and ckpt_path.exists():
        state = checkpoint.load_checkpoint(ckpt_path, model, optimizer)
        if state["hparams"] != hparams:
            raise SystemExit(f"--resume with different settings: checkpoint {state['hparams']} vs now {hparams}")
        if state["corpus_fingerprint"] != fingerprint:
            raise SystemExit("--resume on a different corpus (another Python version?)")
    state["commands"].append(command)
    prior_wall = state["wall_seconds"]  # earlier sessions, up to their last checkpoint

    model.train()
    position = data.DataPosition(*state["position"])
    last_stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    bar = tqdm(total=args.steps, initial=state["step"], desc=f"train {args.arch}", unit="step")
    t_loop = time.time()
    train_loss_ema = state["train_loss_ema"]  # for display and the record only
    for step in range(state["step"], last_stop):
        lr = learning_rate(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch, position = sampler.batch(position)
        input_ids = torch.from_numpy(batch)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        train_loss_ema = loss.item() if train_loss_ema is None else 0.95 * train_loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss_ema:.3f}", lr=f"{lr:.2e}")
        if done % args.eval_every == 0 or done == args.steps:
            val = evaluation.model_loss(model, val_windows[probe], byte_lengths, eval_batch)
            state["val_curve"].append({"step": done, "val_loss": round(val.loss, 5),
                                       "train_loss_ema": round(train_loss_ema, 5)})
            tqdm.write(f"step {done}: val loss {val.loss:.4f} nats/token, train (ema) {train_loss_ema:.4f}")
        if done % args.checkpoint_every == 0 or done == last_stop:
            state.update(step=done, position=[position.epoch, position.batch], train_loss_ema=train_loss_ema,
                         train_seconds=state["train_seconds"] + time.time() - t_loop,
                         wall_seconds=prior_wall + time.time() - t_start)
            t_loop = time.time()
            checkpoint.save_checkpoint(ckpt_path, model, optimizer, state)
    bar.close()
    if last_stop < args.steps:
        print(f"stopped after step {last_stop}; continue with --resume")
        return {}

    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as tmp_name:
        tmp = pathlib.Path(tmp_name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Score the saved files, reloaded as a user would, not the in-memory model.
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        saved_tok = AutoTokenizer.from_pretrained(tmp)
        val = evaluation.model_loss(saved, val_windows, byte_lengths, eval_batch)
        log_probs = evaluation.unigram_log_probs(train_stream, len(tokenizer))
        uni = evaluation.unigram_loss(log_probs, val_windows, byte_lengths)
        sample = heldout.load_sample()
        sample_ids = np.asarray(saved_tok.backend_tokenizer.encode(sample, add_special_tokens=False).ids)
        sample_loss = evaluation.heldout_loss(saved, saved_tok, sample, window=512)
        text = greedy_sample(saved, saved_tok)
        record = {
            "arch": args.arch,
            "model_class": type(saved).__name__,
            "config_summary": config_summary(saved.config),
            "parameter_count": sum(p.numel() for p in saved.parameters()),
            "seed": args.seed,
            "hyperparameters": hparams | {"warmup": args.warmup},
            "steps": args.steps,
            "tokens_seen": args.steps * args.batch_size * args.seq_len,
            "epochs_seen": round(args.steps / sampler.batches_per_epoch, 3),
            "wall_time_s": round(prior_wall + time.time() - t_start, 1),
            "train_loop_seconds": round(state["train_seconds"], 1),
            "threads": torch.get_num_threads(),
            "final_val_loss": val.loss,
            "final_val_bits_per_byte": val.bits_per_byte,
            "unigram_val_loss": uni.loss,
            "unigram_val_bits_per_byte": uni.bits_per_byte,
            "val_predicted_tokens": val.tokens,
            "val_predicted_bytes": val.bytes,
            "val_curve": state["val_curve"],
            "heldout_sample": {
                "file": heldout.SAMPLE_PATH.name,
                "sha256": heldout.sample_sha256(),
                "window": 512,
                "loss": sample_loss,
                # The same predicted tokens as heldout_loss: all but each window's first.
                "unigram_loss": float(-log_probs[sample_ids[np.arange(len(sample_ids)) % 512 != 0]].mean()),
            },
            "greedy_sample": {"prompt": _SAMPLE_PROMPT, "new_tokens": 60, "text": text},
            "corpus": {
                "source": "CPython standard library .py files (see hooked_recurrent/pretrained/corpus.py)",
                "python_version": platform.python_version(),
                "fingerprint_sha256": fingerprint,
                "files": {"train": len(train_files), "val": len(val_files)},
                "train_tokens": int(len(train_stream)),
                "val_windows": int(len(val_windows)),
            },
            "software": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                         "numpy": np.__version__, "platform": platform.platform()},
            "git": git_state(),
            "command": state["commands"][0],
            "session_commands": state["commands"],
        }
        (tmp / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
        _publish(tmp, args.out)
    print(json.dumps({k: record[k] for k in ("final_val_loss", "unigram_val_loss", "tokens_seen", "wall_time_s")}))
    return record


if __name__ == "__main__":
    main()
