"""Training: factor-form losses, resampling, schedule, exact resume, files, planted-atom recovery."""

import json
import math
import warnings

import jaxtyping
import pytest
import torch
from helpers import LargestTensor, planted_rank1_states

with jaxtyping.install_import_hook("writesae", "beartype.beartype"):
    from writesae import (
        FactorSource,
        TensorSource,
        TrainerConfig,
        WriteSAETrainer,
        WriteTrainingSAE,
        WriteTrainingSAEConfig,
    )
    from writesae.data import IterableSource
    from writesae.resample import resample_dead_atoms
    from writesae.trainer import learning_rate

from sae_lens import SAE


@pytest.fixture(autouse=True)
def one_thread():
    # Small tensors: a second intra-op thread only adds synchronisation, badly so on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def training_sae(d_k=6, d_v=5, d_sae=24, k=3, seed=0, **kw) -> WriteTrainingSAE:
    cfg = WriteTrainingSAEConfig.build(d_k=d_k, d_v=d_v, d_sae=d_sae, k=k, **kw)
    sae = WriteTrainingSAE(cfg, seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        if cfg.input_mean == "fixed":
            sae.input_mean.normal_(0, 0.3)
    return sae


def reference_losses(sae: WriteTrainingSAE, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse, aux) per entry, from dense matrices and the paper's definitions (float64)."""
    cfg = sae.cfg
    p = {n: t.detach().double() for n, t in sae.state_dict().items()}
    x = x.double()
    mean = p.get("input_mean", torch.zeros_like(p["b_dec"]))
    c_in = mean + (p["b_dec"] if cfg.apply_b_dec_to_input else 0)
    if cfg.variant in ("flat", "matrix"):
        enc = p["W_enc"].T.reshape(-1, cfg.d_k, cfg.d_v)
    else:
        ek, ev = (p["W_enc_key"], p["W_enc_value"]) if "W_enc_key" in p else (p["W_dec_key"], p["W_dec_value"])
        enc = torch.einsum("irk,irv->ikv", ek, ev)
    atoms = p["W_dec"].reshape(-1, cfg.d_k, cfg.d_v) if "W_dec" in p else torch.einsum("irk,irv->ikv", p["W_dec_key"], p["W_dec_value"])
    pre = torch.einsum("bkv,ikv->bi", x - c_in, enc) + p["b_enc"]
    if cfg.sparsity == "topk":
        idx = pre.argsort(-1, descending=True)[:, : cfg.k]
        codes = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).clamp(min=0))
    else:  # training mode: batch-level
        flat = pre.clamp(min=0).flatten()
        idx = flat.argsort(descending=True)[: cfg.k * pre.shape[0]]
        codes = torch.zeros_like(flat).scatter(0, idx, flat[idx]).reshape(pre.shape)
    recon = torch.einsum("bi,ikv->bkv", codes, atoms) + p["b_dec"] + mean
    resid = x - recon
    mse = resid.pow(2).mean()
    masked = pre.masked_fill(~dead, -math.inf)
    aidx = masked.argsort(-1, descending=True)[:, : min(cfg.k_aux, int(dead.sum()))]
    e = torch.zeros_like(pre).scatter(-1, aidx, pre.gather(-1, aidx).clamp(min=0))
    aux = (resid - torch.einsum("bi,ikv->bkv", e, atoms)).pow(2).mean()
    return mse, aux


@pytest.mark.parametrize(
    ("variant", "rank"),
    [("bilinear", 1), ("bilinear", 2), ("matrix", 1), ("matrix", 2), ("bilinear_tied", 1), ("bilinear_tied", 2), ("flat", 1),
     ("bilinear_flat", 1), ("bilinear_flat", 2)],  # fmt: skip
)
@pytest.mark.parametrize("mode", ["gram", "dense"])
def test_factor_form_loss_equals_dense_loss(variant: str, rank: int, mode: str) -> None:
    sae = training_sae(variant=variant, rank=rank, k_aux=7, input_mean="fixed")
    sae.factor_loss = mode
    key, value = torch.randn(9, 6), torch.randn(9, 5)
    writes = key[:, :, None] * value[:, None, :]
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::2] = True

    out_f = sae.compute_loss((key, value), dead)
    mse_ref, aux_ref = reference_losses(sae, writes, dead)
    torch.testing.assert_close(out_f.mse.double(), mse_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out_f.aux.double(), aux_ref, rtol=1e-4, atol=1e-6)

    # gradients of the factor-form loss equal those of the dense (materialised) loss
    grads = []
    for batch in ((key, value), writes):
        sae.zero_grad()
        sae.compute_loss(batch, dead).loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["bilinear", "bilinear_tied"])
def test_factor_form_loss_never_builds_per_sample_matrices(variant: str) -> None:
    """Loss and gradients of B rank-1 writes stay far below B * d_k * d_v elements."""
    b, d = 256, 32
    sae = training_sae(d_k=d, d_v=d, d_sae=16, k=4, variant=variant, k_aux=4, input_mean="fixed")
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:8] = True
    key, value = torch.randn(b, d), torch.randn(b, d)
    with LargestTensor() as rec:
        out = sae.compute_loss((key, value), dead)
        out.loss.backward()
    assert out.aux > 0  # the AuxK term ran too
    # Largest legit tensors: gathered factors (b * K * r * d) and one matrix per atom (d_sae * d * d);
    # the writes themselves would be b * d * d = 262144.
    assert rec.largest <= max(b * 4 * d, 16 * d * d)


def test_batchtopk_training_loss_matches_reference() -> None:
    sae = training_sae(sparsity="batchtopk", k_aux=5)
    key, value = torch.randn(8, 6), torch.randn(8, 5)
    dead = torch.rand(24) < 0.5
    out = sae.compute_loss((key, value), dead)
    mse_ref, aux_ref = reference_losses(sae, key[:, :, None] * value[:, None, :], dead)
    torch.testing.assert_close(out.mse.double(), mse_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.aux.double(), aux_ref, rtol=1e-4, atol=1e-6)
    sae.eval()  # outside training: per-sample TopK (the default inference rule)
    assert ((sae.compute_loss((key, value)).code.dense != 0).sum(-1) <= 3).all()


def test_runs_under_saelens_trainer() -> None:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = training_sae(sparsity="batchtopk")
    before = sae.W_dec_key.detach().clone()
    data = (torch.randn(16, 30) for _ in range(100))
    cfg = SAETrainerConfig(
        total_training_samples=16 * 5, train_batch_size_samples=16, dead_feature_window=2, lr_end=3e-5
    )
    SAETrainer(cfg, sae, data).fit()
    assert not torch.equal(before, sae.W_dec_key)
    assert float(sae.topk_threshold) > 0


def test_seeded_init_is_reproducible_and_leaves_global_rng() -> None:
    cfg = WriteTrainingSAEConfig.build(d_k=6, d_v=5, d_sae=24, k=3)
    state = torch.get_rng_state()
    a, b = WriteTrainingSAE(cfg, seed=5), WriteTrainingSAE(cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_dec_key, WriteTrainingSAE(cfg, seed=6).W_dec_key)


def test_learning_rate_schedule() -> None:
    cfg = TrainerConfig(lr=3e-4, lr_min=3e-5, warmup_steps=50)
    lrs = [learning_rate(s, 1000, cfg) for s in range(1000)]
    assert lrs[0] == pytest.approx(3e-4 / 50) and lrs[49] == pytest.approx(3e-4)
    assert lrs[-1] == pytest.approx(3e-5)
    assert all(a >= b for a, b in zip(lrs[49:], lrs[50:]))  # monotone decay after warm-up


def stepped_sae_with_two_dead_atoms(**cfg):
    """An SAE (8 atoms, k 2) after one Adam step from ``b_dec = 0``, a batch of 4 writes whose sample 2 alone has
    error (so it is the one a resampled atom is drawn from), and atoms 1 and 5 marked dead."""
    sae = training_sae(d_sae=8, k=2, **cfg)
    with torch.no_grad():
        sae.b_dec.zero_()
    opt = torch.optim.Adam(sae.parameters())
    sae.compute_loss(torch.randn(4, 6, 5)).loss.backward()
    opt.step()
    key, value = torch.randn(4, 6), torch.randn(4, 5)
    sq_err = torch.tensor([0.0, 0.0, 5.0, 0.0])  # only sample 2 can be drawn
    dead = torch.tensor([False, True, False, False, False, True, False, False])
    return sae, opt, key, value, sq_err, dead


def test_resampling_sets_atoms_from_high_error_sample() -> None:
    sae, opt, key, value, sq_err, dead = stepped_sae_with_two_dead_atoms(rank=1)
    alive_enc = sae.W_enc_key[~dead].detach().clone()
    n = resample_dead_atoms(sae, opt, dead, (key, value), sq_err, torch.Generator().manual_seed(0))
    assert n == 2
    atom = sae.atom_matrices([1, 5])
    target = torch.outer(key[2], value[2])
    cos = (atom.flatten(1) @ target.flatten()) / target.norm()
    torch.testing.assert_close(cos.abs(), torch.ones(2))  # decoder = the sample's direction
    enc = torch.einsum("irk,irv->ikv", sae.W_enc_key[[1, 5]], sae.W_enc_value[[1, 5]])
    torch.testing.assert_close(((enc.flatten(1) @ target.flatten()) / (enc.flatten(1).norm(dim=-1) * target.norm())).abs(), torch.ones(2))
    alive_norm = torch.einsum("irk,irv->ikv", sae.W_enc_key[~dead], sae.W_enc_value[~dead]).flatten(1).norm(dim=-1).mean()
    torch.testing.assert_close(enc.flatten(1).norm(dim=-1), torch.full((2,), 0.2) * alive_norm)
    assert torch.equal(sae.W_enc_key[~dead], alive_enc)  # alive atoms untouched
    assert (sae.b_enc[[1, 5]] == 0).all()
    for p in (sae.W_dec_key, sae.W_enc_value, sae.b_enc):
        state = opt.state[p]
        assert (state["exp_avg"][[1, 5]] == 0).all() and (state["exp_avg_sq"][[1, 5]] == 0).all()
        assert (state["exp_avg_sq"][~dead] != 0).any()


@pytest.mark.parametrize("variant", ["bilinear", "matrix", "bilinear_tied", "flat", "bilinear_flat"])
@pytest.mark.parametrize("form", ["states", "factors"])
@pytest.mark.parametrize("resample_from", ["input", "residual"])
def test_every_variant_trains_through_resampling(variant: str, form: str, resample_from: str) -> None:
    sae = training_sae(variant=variant, rank=1 if variant == "flat" else 2, d_sae=32, k=1,
                       sparsity="batchtopk", batchtopk_inference="threshold")  # fmt: skip
    keys, values = torch.randn(96, 6), torch.randn(96, 5)
    data = FactorSource(keys, values) if form == "factors" else TensorSource(keys[:, :, None] * values[:, None, :])
    cfg = TrainerConfig(batch_size=16, epochs=2, dead_steps=1, resample_every=3, renorm_every=12,
                        resample_from=resample_from, progress=False, warmup_steps=2)  # fmt: skip
    trainer = WriteSAETrainer(sae, data, cfg)
    logs = [trainer.train_step(b) for b in data.batches(0, 16)] + [trainer.train_step(b) for b in data.batches(1, 16)]
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert sum(r["resampled"] for r in logs) > 0
    # step 12 re-normalised every factor (dense decoders: every W_dec row); resampling sets unit factors too
    rows = [sae.W_dec] if variant in ("flat", "bilinear_flat") else [sae.W_dec_key, sae.W_dec_value]
    for p in rows:
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(p.shape[:-1]))
    assert float(sae.topk_threshold) > 0
    sae.eval()
    codes = sae.encode(keys[:4, :, None] * values[:4, None, :])
    assert ((codes == 0) | (codes > sae.topk_threshold)).all()


def test_resampling_a_bilinear_flat_atom_aims_its_filter_and_its_row_at_the_sample() -> None:
    """Reference code's rule for BilinearEncoderFlatSAE: matched filter from the sample's top singular pairs
    (at 0.2 x the alive encoders' mean norm), decoder row = the sample's unit direction."""
    sae, opt, key, value, sq_err, dead = stepped_sae_with_two_dead_atoms(rank=2, variant="bilinear_flat")
    alive_enc = torch.einsum("irk,irv->ikv", sae.W_enc_key[~dead], sae.W_enc_value[~dead]).detach().clone()
    assert resample_dead_atoms(sae, opt, dead, (key, value), sq_err, torch.Generator().manual_seed(0)) == 2
    # "input": the sample minus the decoder offset (b_dec moved a little in the Adam step above)
    target = (torch.outer(key[2], value[2]) - sae.b_dec).detach().reshape(-1)
    torch.testing.assert_close(sae.W_dec[[1, 5]], (target / target.norm()).expand(2, -1))
    enc = torch.einsum("irk,irv->ikv", sae.W_enc_key[[1, 5]], sae.W_enc_value[[1, 5]]).flatten(1)
    # the filter is scale * (u_1 v_1^T + u_2 v_2^T) with the target's top two singular pairs: its inner
    # product with the target is scale * (sigma_1 + sigma_2)
    sigma = torch.linalg.svdvals(target.reshape(6, 5))
    scale = 0.2 * alive_enc.flatten(1).norm(dim=-1).mean()
    torch.testing.assert_close(enc @ target, (scale * sigma[:2].sum()).expand(2))
    assert torch.equal(torch.einsum("irk,irv->ikv", sae.W_enc_key[~dead], sae.W_enc_value[~dead]), alive_enc)
    assert (sae.b_enc[[1, 5]] == 0).all()


def test_renormalising_every_step_keeps_unit_factors() -> None:
    sae = training_sae(rank=2)
    cfg = TrainerConfig(batch_size=8, epochs=1, renorm_every=1, progress=False, warmup_steps=1, lr=1e-2)
    WriteSAETrainer(sae, TensorSource(torch.randn(40, 6, 5)), cfg).fit()
    for p in (sae.W_dec_key, sae.W_dec_value):
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(24, 2))


def _resume_setup(out_dir, seed: int, input_scaling: str = "none", data_scale: float = 1.0):
    torch.manual_seed(123)
    keys, values = torch.randn(300, 6) * data_scale, torch.randn(300, 5)
    train, val = FactorSource(keys, values, seed=3).split(0.2, seed=42)
    # 64 atoms, one active per sample: many fall silent, so AuxK and resampling (RNG draws) run.
    sae = training_sae(seed=seed, input_mean="fixed", k_aux=4, d_sae=64, k=1)
    cfg = TrainerConfig(
        batch_size=32, epochs=3, lr=3e-3, warmup_steps=4, dead_steps=2, resample_every=5,
        renorm_every=4, checkpoint_every=7, out_dir=str(out_dir), progress=False, input_scaling=input_scaling,
    )  # fmt: skip
    return WriteSAETrainer(sae, train, cfg, val=val)


@pytest.mark.parametrize(("input_scaling", "data_scale"), [("none", 1.0), ("unit_mean_square", 1e-3)])
def test_resume_reproduces_uninterrupted_run(tmp_path, input_scaling: str, data_scale: float) -> None:
    full = _resume_setup(tmp_path / "full", seed=0, input_scaling=input_scaling, data_scale=data_scale)
    full.fit()

    crashed = _resume_setup(tmp_path / "resumed", seed=0, input_scaling=input_scaling, data_scale=data_scale)
    real_step = crashed.train_step

    def crash_at_17(batch):
        if crashed.step == 17:
            raise KeyboardInterrupt("simulated crash")
        return real_step(batch)

    crashed.train_step = crash_at_17
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    # A new process would start from a fresh SAE (other init) and trainer, then resume.
    resumed = _resume_setup(tmp_path / "resumed", seed=99, input_scaling=input_scaling, data_scale=data_scale)
    resumed.fit(resume_from=tmp_path / "resumed" / "checkpoint")

    assert resumed.step == full.step
    for name, tensor in full.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    # the log of the resumed run is line for line the uninterrupted run's
    log_full = (tmp_path / "full" / "train_log.jsonl").read_text()
    assert (tmp_path / "resumed" / "train_log.jsonl").read_text() == log_full
    records = [json.loads(line) for line in log_full.splitlines()]
    assert any(r["type"] == "train" and r["resampled"] > 0 and r["step"] > 17 for r in records)
    assert any(r["type"] == "train" and r["aux"] > 0 for r in records)


def test_files_log_and_best_checkpoint(tmp_path) -> None:
    trainer = _resume_setup(tmp_path, seed=0)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    val = [r for r in records if r["type"] == "val"]
    assert [r["step"] for r in train] == list(range(1, trainer.total_steps + 1))
    for key in ("mse", "nmse", "explained_variance", "l0", "dead_fraction", "lr", "aux"):
        assert key in train[0]
    assert len(val) == 3  # after epochs 1 and 2, and at the end
    best = SAE.load_from_disk(tmp_path / "best")
    assert best.cfg.metadata.val_mse == pytest.approx(min(r["val_mse"] for r in val))
    final = SAE.load_from_disk(tmp_path / "final")
    for name, tensor in trainer.sae.state_dict().items():
        assert torch.equal(final.state_dict()[name], tensor)
    # validation metrics are consistent with each other
    last = val[-1]
    assert 0 < last["val_nmse"] and last["val_explained_variance"] < 1 and last["val_l0"] <= 1


def test_input_scaling_makes_training_independent_of_the_data_scale(tmp_path) -> None:
    """Training on S and on s*S with input_scaling gives the same atoms, and biases and codes in
    each data's own units; the files and metrics are in raw units too. (s is a power of two, so
    both runs see bit-identical scaled data and TopK makes the same choices.)"""
    s = 2.0**-10
    unit = _resume_setup(tmp_path / "unit", seed=0, input_scaling="unit_mean_square")
    unit.fit()
    tiny = _resume_setup(tmp_path / "tiny", seed=0, input_scaling="unit_mean_square", data_scale=s)
    tiny.fit()
    for name, tensor in unit.sae.state_dict().items():
        factor = s if name in ("b_enc", "b_dec", "input_mean") else 1.0
        torch.testing.assert_close(tiny.sae.state_dict()[name], tensor * factor, rtol=1e-5, atol=1e-7 * factor, msg=name)
    assert tiny.last_val["val_mse"] == pytest.approx(unit.last_val["val_mse"] * s**2, rel=1e-5)
    assert tiny.last_val["val_explained_variance"] == pytest.approx(unit.last_val["val_explained_variance"], abs=1e-6)
    # the saved best SAE, run on the raw validation data, has the validation MSE it was saved with
    best = SAE.load_from_disk(tmp_path / "tiny" / "best")
    errors = []
    for keys, values in tiny.val_source.batches(0, 32):
        writes = keys[:, :, None] * values[:, None, :]
        errors.append((best.decode(best.encode(writes)) - writes).detach().pow(2).flatten(1))
    assert torch.cat(errors).mean().item() == pytest.approx(best.cfg.metadata.val_mse, rel=1e-4)


def test_raw_training_on_tiny_data_suggests_input_scaling(tmp_path) -> None:
    trainer = _resume_setup(tmp_path, seed=0, data_scale=1e-3)
    with pytest.warns(UserWarning, match="input_scaling='unit_mean_square'"):
        trainer.fit()
    # dense states, in either layout, are measured by their whole Frobenius norm: mean square 0.05
    # (inside the band; per row of a [d_k, d_v] matrix it would be 0.05 / 6) trains silently
    cfg = TrainerConfig(batch_size=16, epochs=1, progress=False)
    near_unit = torch.randn(32, 6, 5) * (0.05 / 30) ** 0.5
    for states in (near_unit, near_unit.flatten(1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            WriteSAETrainer(training_sae(), states, cfg).fit()
        with pytest.warns(UserWarning, match="far from 1"):
            WriteSAETrainer(training_sae(), states * 1e-3, cfg).fit()


def test_iterable_source_rebatches_and_needs_a_length() -> None:
    chunks = [torch.randn(n, 6, 5) for n in (5, 9, 2)]
    source = IterableSource(chunks)
    sizes = [b.shape[0] for b in source.batches(0, 4)]
    assert sizes == [4, 4, 4, 4]
    assert torch.equal(torch.cat(list(source.batches(1, 4, start=1))), torch.cat(chunks)[4:])
    with pytest.raises(ValueError, match="max_samples"):
        WriteSAETrainer(training_sae(), source, TrainerConfig(progress=False))
    gen = IterableSource(iter(chunks))
    list(gen.batches(0, 4))
    with pytest.raises(RuntimeError, match="one-shot iterator"):
        list(gen.batches(1, 4))


def test_planted_rank1_atoms_are_recovered() -> None:
    """A bilinear TopK WriteSAE recovers a planted dictionary of 64 random rank-1 atoms.

    Data: 16 x 16 states, each a sum of 4 distinct planted atoms with coefficients in [0.5, 2].
    Metric: for each planted atom, the best |Frobenius cosine| with a learned atom; mean over atoms.
    """
    d = 16
    planted, states = planted_rank1_states(64, d, d, 20_000, per_state=4, low=0.5, high=2.0, seed=1234)
    train, val = TensorSource(states, seed=0).split(0.2, seed=42)
    sae = WriteTrainingSAE(WriteTrainingSAEConfig.build(d_k=d, d_v=d, d_sae=128, k=4), seed=0)
    cfg = TrainerConfig(epochs=15, lr=3e-3, lr_min=3e-4, progress=False)
    trainer = WriteSAETrainer(sae, train, cfg, val=val)
    trainer.fit()
    with torch.no_grad():
        learned = torch.nn.functional.normalize(sae.atom_matrices().flatten(1), dim=-1)
        best = (planted.flatten(1) @ learned.T).abs().max(-1).values
    print(f"planted-atom recovery: mean best |cos| = {best.mean():.4f} (min {best.min():.4f}); "
          f"val EV = {trainer.last_val['val_explained_variance']:.4f}")  # fmt: skip
    assert best.mean() >= 0.9


def test_bilinear_flat_training_lowers_mse_on_a_planted_dictionary() -> None:
    """A matched-filter encoder over a dense decoder learns a planted dictionary of 16 rank-1 atoms.

    Data: 8 x 8 states, each a sum of 2 distinct planted atoms with coefficients in [0.5, 2]. Training cuts
    the validation MSE of the initial SAE many times over, and the dense decoder rows line up with the
    planted atoms (best |Frobenius cosine| per planted atom, as in the bilinear recovery test above).
    """
    d = 8
    planted, states = planted_rank1_states(16, d, d, 3000, per_state=2, low=0.5, high=2.0, seed=5)
    train, val = TensorSource(states, seed=0).split(0.2, seed=42)
    cfg = WriteTrainingSAEConfig.build(d_k=d, d_v=d, d_sae=32, k=2, variant="bilinear_flat")
    sae = WriteTrainingSAE(cfg, seed=0)
    with torch.no_grad():
        before = float(sae.compute_loss(val.states).mse)
    trainer = WriteSAETrainer(sae, train, TrainerConfig(epochs=8, batch_size=64, lr=3e-3, lr_min=3e-4, progress=False),
                              val=val)  # fmt: skip
    trainer.fit()
    with torch.no_grad():
        after = float(sae.compute_loss(val.states).mse)
        best = (planted.flatten(1) @ torch.nn.functional.normalize(sae.W_dec, dim=-1).T).abs().max(-1).values
    print(f"bilinear_flat on a planted dictionary: val MSE {before:.4g} -> {after:.4g}; "
          f"mean best |cos| {best.mean():.4f}")  # fmt: skip
    assert after == pytest.approx(trainer.last_val["val_mse"], rel=1e-4)
    assert after < 0.2 * before  # measured: 11x lower
    assert best.mean() >= 0.9
