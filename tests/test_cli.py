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
from writesae.protocols.install import Install
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


def test_sigterm_becomes_a_clean_stop_and_the_handler_is_restored(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped), stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before

    def interrupted(args):
        raise KeyboardInterrupt

    args = argparse.Namespace(command="collect", out=tmp_path / "x", resume=False, resume_note="saved every 16 batches",
                              func=interrupted)  # fmt: skip
    out = tmp_path / "x"
    assert run_command(args, ["collect", "m", "--out", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err  # nothing saved yet: the command to run is the same one, not --resume
    assert "stopped by Ctrl-C" in err and err.strip().endswith(f"writesae collect m --out {out}")
    out.mkdir()
    (out / "collect_checkpoint").mkdir()
    assert run_command(args, ["collect", "m", "--out", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "saved every 16 batches" in err and err.strip().endswith(f"writesae collect m --out {out} --resume")


def test_a_stopped_protocol_command_resumes_to_the_uninterrupted_records(tmp_path, capsys, monkeypatch):
    argv = ["install", "tiny-random:qwen3.5", "--layer", "0", "--head", "1", "--tokens", "random", "--sequences", "3",
            "--seq-len", "12", "--new-tokens", "2", "--device", "cpu", "--out"]  # fmt: skip
    assert main([*argv, str(tmp_path / "full")]) == 0
    full = (tmp_path / "full" / "records.jsonl").read_text()
    out = tmp_path / "cut"
    original, calls = Install._prompt, []

    def stopped_at_the_second_prompt(self, b):
        if calls:
            raise KeyboardInterrupt
        calls.append(b)
        return original(self, b)

    monkeypatch.setattr(Install, "_prompt", stopped_at_the_second_prompt)
    assert main([*argv, str(out)]) == 130
    err = capsys.readouterr().err
    assert "records are saved sequence by sequence" in err and err.strip().endswith(f"--out {out} --resume")
    monkeypatch.setattr(Install, "_prompt", original)
    assert main([*argv, str(out)]) == 2 and "--resume" in capsys.readouterr().err
    assert main([*argv, str(out), "--resume"]) == 0
    assert "unfinished: its finished units are kept" in capsys.readouterr().out
    assert (out / "records.jsonl").read_text() == full  # the first prompt was not run again, the rest was
    summary = (tmp_path / "full" / "summary.json").read_text()
    assert (out / "summary.json").read_text() == summary
    assert main([*argv, str(out), "--resume"]) == 0  # finished: nothing runs again
    assert "finished: no unit runs again" in capsys.readouterr().out
    assert (out / "records.jsonl").read_text() == full and (out / "summary.json").read_text() == summary
    assert main([*argv[:-1], "--multiples", "2", "--out", str(out), "--resume"]) == 2
    assert "other settings (config:" in capsys.readouterr().err


def test_threads_option_sets_torch_threads_for_the_command(tmp_path):
    # On a machine shared with other jobs, torch's default (one thread per core) mostly waits: --threads 1 helps.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["spectra", "tiny-random:qwen3.5", "--tokens", "random", "--sequences", "2", "--seq-len", "8",
                "--threads", "1", "--out", str(tmp_path / "s")]
        assert main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_seed_sets_the_protocols_own_draws_only_when_given(tmp_path):
    """Without --seed a command draws like the Python API (the config's own seed); --seed sets both."""
    import json

    from writesae.protocols.install import InstallConfig

    argv = ["install", "tiny-random:qwen3.5", "--layer", "0", "--head", "1", "--tokens", "random", "--sequences", "1",
            "--seq-len", "12", "--new-tokens", "1", "--multiples", "1", "--device", "cpu", "--out"]  # fmt: skip
    seeds = {}
    for name, extra in (("default", []), ("given", ["--seed", "3"])):
        assert main([*argv, str(tmp_path / name), *extra]) == 0
        seeds[name] = json.loads((tmp_path / name / "settings.json").read_text())["config"]["seed"]
    assert seeds == {"default": InstallConfig().seed, "given": 3}
