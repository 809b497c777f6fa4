"""Training refuses bad data and bad states with the real cause, and its best checkpoint is what it reports."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

from helpers import random_tokens, tiny_pair
from writesae import CheckpointError, FactorSource, TensorSource, TrainerConfig, WriteSAE, WriteSAETrainer, WriteTrainingSAE
from writesae.config import WriteTrainingSAEConfig
from writesae.outputs import OutputExistsError
from writesae.shards import CellRows
from writesae.store import collect
from writesae.streaming import StoreSource
from writesae.trainer import TrainingError
from writesae.training import train_on_store


def sae(d_sae: int = 16, k: int = 2, seed: int = 0) -> WriteTrainingSAE:
    return WriteTrainingSAE(WriteTrainingSAEConfig.build(d_k=6, d_v=5, d_sae=d_sae, k=k), seed=seed)


def config(**kw) -> TrainerConfig:
    return TrainerConfig(**{"batch_size": 16, "epochs": 2, "warmup_steps": 1, "lr": 1e-2, "progress": False, **kw})


def states(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 6, 5, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = tiny_pair("tiny-random:qwen3.5")[0]
    out = tmp_path_factory.mktemp("refusals") / "store"
    return collect(model, random_tokens(16, 24, seed=5), layers=[0], heads=[1], kind="write", out_dir=out, verbose=False)


def test_non_finite_data_is_refused_naming_where(store, tmp_path):
    data = states()
    data[37, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="training batch 2 of epoch 0: row 5 of the states holds NaN"):
        WriteSAETrainer(sae(), TensorSource(data, shuffle=False), config()).fit()
    shard = sorted((store.path / "train" / "L0_H1").glob("shard_*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["values"][3, 0] = float("inf")
    broken = tmp_path / "shard_00000.safetensors"
    save_file(tensors, broken)
    source = StoreSource(CellRows([broken]), kind="write")
    with pytest.raises(ValueError, match=f"store shard {broken}: row 3 \\(sequence \\d+, position \\d+\\) of 'values'"):
        list(source.batches(0, 8))  # refused when the row is read


def test_divergence_names_the_step_and_a_learning_rate_and_writes_no_nan(tmp_path):
    run = WriteSAETrainer(sae(), TensorSource(states()), config(lr=1e9, lr_min=1e9, out_dir=tmp_path, checkpoint_every=2))
    with pytest.raises(TrainingError, match=r"diverged at step \d+ .* lower learning rate, e\.g\. lr=1e\+08"):
        run.fit()
    for weights in tmp_path.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values() if t.is_floating_point()), weights
    with torch.no_grad():
        next(run.sae.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="refusing to save non-finite weights"):
        run.sae.save_inference_model(tmp_path / "nan")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.zeros(64, 6, 5), "every training sample is the same"),
        ((torch.ones(64, 6), torch.ones(64, 5)), "every training sample is the same"),
        (torch.zeros(0, 6, 5), "holds no sample"),
    ],
)
def test_constant_or_empty_data_is_refused(data, message):
    source = TensorSource(data) if isinstance(data, torch.Tensor) else FactorSource(*data)
    with pytest.raises(TrainingError, match=message):
        WriteSAETrainer(sae(), source, config()).fit()


def test_training_works_with_grad_disabled_globally():
    run = WriteSAETrainer(sae(), TensorSource(states()), config(epochs=1))
    before = run.sae.W_enc_key.clone() if hasattr(run.sae, "W_enc_key") else next(run.sae.parameters()).clone()
    with torch.set_grad_enabled(False):
        run.fit()
    after = run.sae.W_enc_key if hasattr(run.sae, "W_enc_key") else next(run.sae.parameters())
    assert not torch.equal(before, after)


def test_a_resumed_run_returns_the_best_weights_it_reports(store, tmp_path, monkeypatch):
    """train_on_store returns the best validation weights with that validation's metrics, also
    when the run was interrupted after its best validation and resumed."""
    # A learning rate high enough that the best validation (step 3) is far from the last (step 44).
    trainer = dict(epochs=4, batch_size=32, lr=0.3, warmup_steps=1, val_every=3, progress=False)
    full, full_metrics = train_on_store(store, 0, 1, d_sae=16, k=2, trainer=TrainerConfig(**trainer, out_dir=tmp_path / "a"))
    assert full_metrics["best_step"] < 20
    real = WriteSAETrainer.train_step
    stop = {"at": 20}

    def train_step(self, batch):
        if self.step == stop["at"]:
            raise KeyboardInterrupt
        return real(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(WriteSAETrainer, "train_step", train_step)
        with pytest.raises(KeyboardInterrupt):
            train_on_store(store, 0, 1, d_sae=16, k=2, trainer=TrainerConfig(**trainer, out_dir=tmp_path / "b"))
    resumed, metrics = train_on_store(store, 0, 1, d_sae=16, k=2, trainer=TrainerConfig(**trainer, out_dir=tmp_path / "b"),
                                      resume_from=tmp_path / "b" / "checkpoint")  # fmt: skip
    assert metrics == full_metrics
    for name, tensor in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    val = store.read(0, 1, "val")
    with torch.no_grad():
        recon = resumed((val["keys"][:, :, None] * val["values"][:, None, :]))
    mse = float((recon - val["keys"][:, :, None] * val["values"][:, None, :]).pow(2).mean())
    assert metrics["best_val_mse"] == pytest.approx(mse, rel=1e-4) and metrics["val_mse"] == metrics["best_val_mse"]
    best = SAE.load_from_disk(tmp_path / "b" / "best")
    for name, tensor in best.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_a_checkpoint_is_not_an_sae_and_a_used_folder_is_not_reused(store, tmp_path):
    trainer = TrainerConfig(epochs=1, batch_size=64, progress=False, out_dir=tmp_path)
    train_on_store(store, 0, 1, d_sae=16, k=2, trainer=trainer)
    with pytest.raises(CheckpointError, match="is a training checkpoint"):
        WriteSAE.load_from_disk(tmp_path / "checkpoint")
    with pytest.raises(Exception, match="write_sae_training_checkpoint"):  # SAELens' own loader knows no such SAE
        SAE.load_from_disk(tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        WriteSAETrainer(sae(), TensorSource(states()), config()).fit(resume_from=tmp_path / "best")
    with pytest.raises(OutputExistsError, match="already holds a training run .* fit\\(resume_from="):
        train_on_store(store, 0, 1, d_sae=16, k=2, trainer=trainer)
    with pytest.raises(KeyError, match="has no layer 0 head 3"):
        train_on_store(store, 0, 3, d_sae=16, k=2, trainer=trainer)
    assert math.isfinite(SAE.load_from_disk(tmp_path / "best").cfg.metadata.val_mse)
