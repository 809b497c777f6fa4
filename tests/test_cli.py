"""The writesae command: options checked before any work, no clobbering, clean stops that resume exactly."""

from __future__ import annotations

import argparse
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import random_tokens, tiny_pair
from writesae.cli import main
from writesae.cli.running import Stopped, resume_command, run_command, stop_signals
from writesae.store import collect
from writesae.trainer import WriteSAETrainer


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = tiny_pair("tiny-random:qwen3.5")[0]
    out = tmp_path_factory.mktemp("cli") / "store"
    collect(model, random_tokens(16, 24, seed=5), layers=[0], heads=[1], kind="write", out_dir=out, verbose=False)
    return out


def train_args(store, out, *extra):
    return ["train", str(store), "--layer", "0", "--head", "1", "--d-sae", "16", "--k", "2", "--epochs", "3",
            "--batch-size", "64", "--lr", "3e-3", "--out", str(out), *extra]  # fmt: skip


def stop_at_step(monkeypatch, step: int, signal_name: str | None = None) -> None:
    """Make training stop before ``step`` as Ctrl-C (KeyboardInterrupt) or SIGTERM (Stopped) would."""
    real = WriteSAETrainer.train_step

    def train_step(self, batch):
        if self.step == step:
            raise Stopped(signal_name) if signal_name else KeyboardInterrupt()
        return real(self, batch)

    monkeypatch.setattr(WriteSAETrainer, "train_step", train_step)


def test_train_refuses_an_existing_run_and_a_stopped_run_resumes_to_the_same_weights(store, tmp_path, monkeypatch, capsys):
    assert main(train_args(store, tmp_path / "full")) == 0
    assert main(train_args(store, tmp_path / "full")) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err

    with monkeypatch.context() as patch:
        stop_at_step(patch, 5, "SIGTERM")
        assert main(train_args(store, tmp_path / "cut", "--overwrite")) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err
    command = err.strip().splitlines()[-1].strip()
    assert command == resume_command(train_args(store, tmp_path / "cut"))
    assert command.endswith("--resume") and "--overwrite" not in command
    assert main(train_args(store, tmp_path / "cut", "--resume")) == 0

    full, resumed = (load_file(tmp_path / run / "sae" / "sae_weights.safetensors") for run in ("full", "cut"))
    for name, tensor in full.items():
        assert torch.equal(resumed[name], tensor), name
    assert (tmp_path / "cut" / "train_log.jsonl").read_text() == (tmp_path / "full" / "train_log.jsonl").read_text()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--seq-len", "0", "--out", "x"], "--seq-len: 0 is not a positive"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--sequences", "0", "--out", "x"], "--sequences: 0"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--dtype", "float33", "--out", "x"], "invalid choice: 'float33'"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--store-dtype", "int8", "--out", "x"], "invalid choice: 'int8'"),
        (["collect", "tiny-random:qwen3.5", "--layer", "-1", "--out", "x"], "--layer: -1 is negative"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--positions-per-sequence", "0", "--out", "x"], "--positions-per-sequence: 0"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--device", "cuda:99", "--out", "x"], "--device"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--device", "tpu", "--out", "x"], "--device"),
        (["collect", "tiny-random:gpt2", "--layer", "0", "--out", "x"], "tiny-random:gpt2"),
        (["collect", "stdlib:gpt2", "--layer", "0", "--out", "x"], "stdlib:gpt2"),
        (["collect", "tiny-random:qwen3.5", "--layer", "0", "--out", "x", "--resume", "--overwrite"], "not allowed with"),
        (["train", "no-such-store", "--layer", "0", "--head", "0", "--out", "x"], "argument store: no-such-store does not exist"),
        (["logit-shift", "tiny-random:qwen3.5", "--n-atoms", "0", "--sae", "no-sae", "--out", "x"], "--n-atoms: 0"),
        (["logit-shift", "tiny-random:qwen3.5", "--sae", "no-sae", "--out", "x"], "--sae: no-sae: not a directory"),
        (["install", "tiny-random:qwen3.5", "--layer", "0", "--head", "0", "--new-tokens", "-1", "--out", "x"], "--new-tokens: -1"),
        (["demo", "--threads", "-2"], "--threads: -2 is negative"),
    ],
)
def test_bad_options_stop_before_any_work_naming_the_option_and_value(argv, named, capsys):
    if "--device" in argv and torch.cuda.is_available() and argv[argv.index("--device") + 1] != "tpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_train_lr_and_a_model_file_are_refused(store, tmp_path, capsys):
    for lr in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            main(train_args(store, tmp_path / "o", "--lr", lr))
        assert f"--lr: {lr}" in capsys.readouterr().err
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(SystemExit):
        main(["collect", str(weights), "--layer", "0", "--out", str(tmp_path / "o")])
    assert "is a file" in capsys.readouterr().err


def test_sigterm_becomes_a_clean_stop_and_the_handler_is_restored(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped), stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before

    def interrupted(args):
        raise KeyboardInterrupt

    args = argparse.Namespace(command="collect", out="stores/x", resume=False, resume_note="saved every 16 batches",
                              func=interrupted)  # fmt: skip
    assert run_command(args, ["collect", "m", "--out", "stores/x", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C" in err and "saved every 16 batches" in err
    assert err.strip().endswith("writesae collect m --out stores/x --resume")
