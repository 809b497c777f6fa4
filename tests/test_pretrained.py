"""Tests of the shipped stdlib models, their registry, corpus split and tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hooked_recurrent.pretrained import SHIPPED_MODELS, shipped_model_path
from hooked_recurrent.pretrained import corpus, heldout
from hooked_recurrent.pretrained.evaluation import heldout_loss

MAX_WEIGHTS_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module", params=sorted(SHIPPED_MODELS))
def shipped(request):
    """(name, path, model, tokenizer, record) for one shipped model, loaded offline in float32."""
    path = shipped_model_path(request.param)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    record = json.loads((path / "training_record.json").read_text())
    return request.param, path, model, tokenizer, record


def test_heldout_loss_matches_record_and_beats_unigram(shipped):
    _, _, model, tokenizer, record = shipped
    info = record["heldout_sample"]
    assert info["sha256"] == heldout.sample_sha256()
    loss = heldout_loss(model, tokenizer, heldout.load_sample(), window=info["window"])
    assert loss == pytest.approx(info["loss"], rel=1e-4)
    # "Clearly below": at least half a nat per token better than the unigram model.
    assert loss < info["unigram_loss"] - 0.5
    assert record["final_val_loss"] < record["unigram_val_loss"] - 0.5


def test_weights_are_small_and_record_is_complete(shipped):
    _, path, model, _, record = shipped
    assert (path / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES
    assert not list(path.glob("resume*")), "resume checkpoints must not be shipped"
    assert record["parameter_count"] == sum(p.numel() for p in model.parameters())
    for key in ("arch", "config_summary", "seed", "tokens_seen", "wall_time_s", "threads",
                "final_val_bits_per_byte", "unigram_val_bits_per_byte", "git", "command"):
        assert key in record
    assert math.isfinite(record["final_val_loss"])


def test_shipped_model_path_resolves_and_rejects():
    for name, folder in SHIPPED_MODELS.items():
        path = shipped_model_path(name)
        assert path.name == folder and (path / "config.json").is_file()
    assert shipped_model_path("Qwen/Qwen3.5-0.8B") is None
    with pytest.raises(ValueError) as err:
        shipped_model_path("stdlib:gpt2")
    for name in SHIPPED_MODELS:
        assert name in str(err.value)


def test_corpus_split_is_deterministic_and_disjoint():
    files = corpus.list_source_files()
    assert files == sorted(files, key=lambda f: f.relpath)
    train, val = corpus.split_files(files)
    assert {f.relpath for f in train}.isdisjoint(f.relpath for f in val)
    assert len(train) + len(val) == len(files) and val and train
    # The split is a function of the path alone, not of listing order.
    train_r, val_r = corpus.split_files(list(reversed(files)))
    assert sorted(f.relpath for f in val_r) == [f.relpath for f in val]
    assert not any("site-packages" in f.relpath or "/test/" in f"/{f.relpath}" for f in files)
    assert not corpus.is_validation("os.py", 0.0) and corpus.is_validation("os.py", 1.0)


def test_tokenizer_round_trips_python():
    tokenizer = AutoTokenizer.from_pretrained(shipped_model_path("stdlib:qwen3.5"), local_files_only=True)
    snippet = 'def __init__(self, x: int = 0) -> None:\n\tself.x = x  # é, ✓, 🐍\n\n\n"""doc"""\n'
    ids = tokenizer.encode(snippet)
    assert tokenizer.decode(ids) == snippet
    assert tokenizer.eos_token_id not in ids  # no BOS/EOS added by default
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["qwen3.5", "mamba2"])
def test_training_script_is_seeded_and_a_resumed_run_ends_with_the_same_weights(arch, tmp_path, monkeypatch):
    """The script behind the shipped weights, on a slice of the corpus: a run interrupted after
    step 3 (its own seeded start) and resumed with --resume ends with exactly the weights of an
    uninterrupted run, and the output folder loads by path into HookedRecurrentModel with HF's
    logits."""
    from safetensors.torch import load_file

    from hooked_recurrent import HookedRecurrentModel
    from hooked_recurrent.pretrained import train

    files = corpus.list_source_files()
    small = [f for f in files if 2_000 <= len(f.text) <= 6_000][:16]  # a few KB each: seconds per run
    monkeypatch.setattr(corpus, "list_source_files", lambda: small)
    threads = torch.get_num_threads()
    common = ["--arch", arch, "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "300",
              "--val-fraction", "0.25", "--eval-every", "3", "--eval-windows", "2", "--eval-batch-size", "64", "--checkpoint-every", "2",
              "--threads", "1"]  # fmt: skip
    try:
        runs = {"a": train.main([*common, "--out", str(tmp_path / "a"), "--checkpoint-dir", str(tmp_path / "ckpt-a")])}
        interrupted = [*common, "--out", str(tmp_path / "c"), "--checkpoint-dir", str(tmp_path / "ckpt-c")]
        assert train.main([*interrupted, "--stop-after", "3"]) == {} and not (tmp_path / "c").exists()
        runs["c"] = train.main([*interrupted, "--resume"])
    finally:
        torch.set_num_threads(threads)
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in runs}
    assert weights["c"].keys() == weights["a"].keys()
    for key, tensor in weights["a"].items():
        assert torch.equal(weights["c"][key], tensor), key
    assert runs["c"]["final_val_loss"] == runs["a"]["final_val_loss"]
    assert runs["c"]["session_commands"][-1].endswith("--resume") and len(runs["c"]["session_commands"]) == 2
    assert runs["a"]["tokens_seen"] == 6 * 2 * 32

    model = HookedRecurrentModel.from_pretrained(str(tmp_path / "a"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    tokens = model.to_tokens("def f(x):\n    return x\n", prepend_bos=False)
    torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
