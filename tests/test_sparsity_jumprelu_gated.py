"""JumpReLU and gated WriteSAEs (paper Table 5, Fig. 8; its Gated SAEs are a negative result).

References written here from the definitions (Rajamanoharan et al. 2024, float64):
    z_i      = <E_i, S - b_dec> + b_enc_i                       (the variant's encoder score plus bias)
    jumprelu = z_i 1[z_i > theta_i],  theta_i = exp(log_threshold_i)
    gated    = 1[z_i > 0] ReLU(exp(r_mag_i) (z_i - b_enc_i) + b_mag_i)
and the straight-through threshold gradient of a rectangle kernel of bandwidth h:
    d a_bi / d theta_i = -(theta_i / h) 1[|z_bi - theta_i| < h / 2],   d H(z_bi - theta_i) / d theta_i = -(1 / h) 1[...]
the latter being the exact derivative of the kernel-smoothed step clamp((z - theta) / h + 1/2, 0, 1).
"""

import math

import jaxtyping
import pytest
import torch
from helpers import planted_rank1_states, random_tokens, tiny_pair

with jaxtyping.install_import_hook("writesae", "beartype.beartype"):
    import writesae  # noqa: F401  (registers the architecture with SAELens)
    from writesae import (
        TensorSource,
        TrainerConfig,
        WriteSAE,
        WriteSAEConfig,
        WriteSAETrainer,
        WriteTrainingSAE,
        WriteTrainingSAEConfig,
    )
    from writesae.protocols.families import FamiliesConfig, parameters_per_atom, run_families
    from writesae.sweep.grid import SweepGrid
    from writesae.trainer import jumprelu_bandwidth
    from writesae.training_sae import SparsityLoss

from sae_lens import SAE

D_K, D_V, D_SAE = 4, 3, 10


def make(sparsity: str, variant: str = "bilinear", training: bool = False, seed: int = 0, **kw):
    """A small SAE with every bias and per-atom parameter away from its initial value."""
    cls, cfg_cls = (WriteTrainingSAE, WriteTrainingSAEConfig) if training else (WriteSAE, WriteSAEConfig)
    sae = cls(cfg_cls.build(d_k=D_K, d_v=D_V, d_sae=D_SAE, variant=variant, sparsity=sparsity, **kw), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_K, D_V, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        if sparsity == "jumprelu":
            sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(math.log(0.05), math.log(0.6), generator=g))
        if sparsity == "gated":
            sae.r_mag.copy_(torch.randn(D_SAE, generator=g) * 0.5)
            sae.b_mag.copy_(torch.randn(D_SAE, generator=g) * 0.3)
    return sae


def scores(sae, states: torch.Tensor) -> torch.Tensor:
    """``<E_i, S - b_dec> + b_enc_i`` in float64, from the weights."""
    p = {n: t.detach().double() for n, t in sae.state_dict().items()}
    if sae.cfg.variant in ("flat", "matrix"):
        enc = p["W_enc"].T.reshape(-1, D_K, D_V)
    else:
        names = ("W_dec_key", "W_dec_value") if sae.cfg.variant == "bilinear_tied" else ("W_enc_key", "W_enc_value")
        ek, ev = (p[n] for n in names)
        enc = torch.einsum("irk,irv->ikv", ek, ev)
    return torch.einsum("bkv,ikv->bi", states.double() - p["b_dec"], enc) + p["b_enc"]


def reference_code(sae, states: torch.Tensor) -> torch.Tensor:
    z = scores(sae, states)
    p = {n: t.detach().double() for n, t in sae.state_dict().items()}
    if sae.cfg.sparsity == "jumprelu":
        return z * (z > p["log_threshold"].exp())
    magnitude = (p["r_mag"].exp() * (z - p["b_enc"]) + p["b_mag"]).clamp(min=0)
    return (z > 0) * magnitude


def atoms(sae) -> torch.Tensor:
    return sae.atom_matrices().detach().double()


@pytest.mark.parametrize("sparsity", ["jumprelu", "gated"])
@pytest.mark.parametrize("variant", ["bilinear", "matrix", "flat", "bilinear_tied", "bilinear_flat"])
def test_codes_follow_their_definitions_for_states_and_factor_pairs(sparsity: str, variant: str) -> None:
    sae = make(sparsity, variant)
    key, value = torch.randn(64, D_K), torch.randn(64, D_V)
    writes = key[:, :, None] * value[:, None, :]
    want = reference_code(sae, writes)
    # both rules leave some atoms off and some on, so the indicator is exercised
    assert 0 < (want != 0).double().mean() < 1
    for got in (sae.encode(writes), sae.encode(writes.flatten(1)), sae.encode((key, value))):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    recon = sae.decode(sae.encode(writes))
    torch.testing.assert_close(recon.double(), torch.einsum("bi,ikv->bkv", want, atoms(sae)) + sae.b_dec.double(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_gated_codes_ignore_k_and_keep_every_open_gate() -> None:
    """``k`` is documented as ignored: an SAE with k=1 keeps every atom whose gate is open."""
    sae = make("gated", k=1)
    states = torch.randn(32, D_K, D_V)
    codes = sae.encode(states)
    assert int((codes != 0).sum(-1).max()) > 1
    torch.testing.assert_close(codes.double(), reference_code(sae, states), rtol=1e-5, atol=1e-6)


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimator() -> None:
    """The gradient of MSE + lambda L0 with respect to log_threshold, against the hand formula; its L0 part
    against finite differences of the kernel-smoothed L0; and the L0 moves the thresholds only."""
    torch.manual_seed(3)
    sae = make("jumprelu", training=True, dtype="float64")
    x = torch.randn(48, D_K, D_V, dtype=torch.float64)
    lam, h = 0.03, 0.4
    settings = SparsityLoss(lam, bandwidth=h)
    out = sae.compute_loss(x, sparsity_loss=settings)
    sae.zero_grad()
    out.loss.backward()
    got = sae.log_threshold.grad.clone()

    z = scores(sae, x)
    theta = sae.log_threshold.detach().exp()
    a = z * (z > theta)
    resid = x - (torch.einsum("bi,ikv->bkv", a, atoms(sae)) + sae.b_dec.detach())
    n_b, d_in = x.shape[0], D_K * D_V
    d_mse_d_a = -2 / (n_b * d_in) * torch.einsum("bkv,ikv->bi", resid, atoms(sae))
    window = ((z - theta).abs() < h / 2).double()
    d_a_d_theta = -(theta / h) * window
    d_l0_d_theta = -(lam / n_b) * window.sum(0) / h
    want = theta * ((d_mse_d_a * d_a_d_theta).sum(0) + d_l0_d_theta)
    assert window.sum(0).gt(0).sum() >= 3  # several atoms have samples inside their kernel window
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)

    # The L0 penalty alone: its gradient is the exact derivative of the kernel-smoothed L0 ...
    sae.zero_grad()
    sae.compute_loss(x, sparsity_loss=settings).penalty.backward()
    lt = sae.log_threshold.detach()

    def smoothed(log_threshold: torch.Tensor) -> torch.Tensor:
        return lam * ((z - log_threshold.exp()) / h + 0.5).clamp(0, 1).sum(-1).mean()

    eps = 1e-6
    finite = torch.stack([(smoothed(lt + eps * e) - smoothed(lt - eps * e)) / (2 * eps) for e in torch.eye(D_SAE)])
    torch.testing.assert_close(sae.log_threshold.grad, finite, rtol=1e-6, atol=1e-9)
    # ... and reaches nothing but the thresholds.
    for name, param in sae.named_parameters():
        if name != "log_threshold":
            assert param.grad is None or not param.grad.any(), name


def test_gated_losses_follow_the_gated_sae_objective() -> None:
    """MSE of the hard-gated code + lambda sum ReLU(pi_gate) + the frozen-decoder MSE of ReLU(pi_gate); the
    frozen term trains no decoder weight; the soft gate g = sigmoid(pi_gate / tau) takes ReLU(pi_gate)'s place
    in all three terms (the code becomes g ReLU(pi_mag)) in training mode."""
    sae = make("gated", training=True, dtype="float64")
    x = torch.randn(40, D_K, D_V, dtype=torch.float64)
    lam, aux_w, tau = 0.02, 0.7, 0.1
    z = scores(sae, x)
    p = {n: t.detach() for n, t in sae.state_dict().items()}
    magnitude = (p["r_mag"].exp() * (z - p["b_enc"]) + p["b_mag"]).clamp(min=0)
    A = atoms(sae)

    def mse(code: torch.Tensor) -> torch.Tensor:
        return (x - torch.einsum("bi,ikv->bkv", code, A) - p["b_dec"]).pow(2).mean()

    frozen_mse = mse(z.clamp(min=0))
    hard = sae.compute_loss(x, sparsity_loss=SparsityLoss(lam, aux_coefficient=aux_w))
    torch.testing.assert_close(hard.mse, mse((z > 0) * magnitude))
    torch.testing.assert_close(hard.penalty, lam * z.clamp(min=0).sum(-1).mean() + aux_w * frozen_mse)
    torch.testing.assert_close(hard.loss, hard.mse + hard.penalty)

    soft_settings = SparsityLoss(lam, gate="soft_sigmoid", temperature=tau, aux_coefficient=aux_w)
    soft = sae.compute_loss(x, sparsity_loss=soft_settings)
    gate = torch.sigmoid(z / tau)  # the soft gate's values replace ReLU(pi_gate) everywhere (reference code)
    torch.testing.assert_close(soft.mse, mse(gate * magnitude))
    torch.testing.assert_close(soft.penalty, lam * gate.sum(-1).mean() + aux_w * mse(gate))
    torch.testing.assert_close(soft.code.dense.double(), (z > 0) * magnitude)  # reported codes: the hard gate
    sae.eval()  # outside training the soft gate is not used
    torch.testing.assert_close(sae.compute_loss(x, sparsity_loss=soft_settings).mse, hard.mse)
    sae.train()

    # The frozen term alone trains no decoder atom (b_dec still learns through the encoder's input S - b_dec).
    sae.zero_grad()
    (sae.compute_loss(x, sparsity_loss=SparsityLoss(0.0, aux_coefficient=1.0)).penalty).backward()
    for name in ("W_dec_key", "W_dec_value"):
        grad = getattr(sae, name).grad
        assert grad is None or not grad.any(), name
    assert sae.b_enc.grad.abs().sum() > 0  # the gate path learns from it


@pytest.mark.parametrize("sparsity", ["jumprelu", "gated"])
@pytest.mark.parametrize("variant", ["bilinear", "matrix", "bilinear_flat"])
@pytest.mark.parametrize("mode", ["gram", "dense"])
def test_factor_form_loss_equals_dense_loss(sparsity: str, variant: str, mode: str) -> None:
    sae = make(sparsity, variant, training=True, k_aux=4)
    sae.factor_loss = mode
    key, value = torch.randn(12, D_K), torch.randn(12, D_V)
    writes = key[:, :, None] * value[:, None, :]
    dead = torch.arange(D_SAE) % 3 == 0
    settings = SparsityLoss(0.05, bandwidth=0.3, gate="soft_sigmoid")
    outs, grads = [], []
    for batch in ((key, value), writes):
        sae.zero_grad()
        out = sae.compute_loss(batch, dead, sparsity_loss=settings)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    for field in ("loss", "mse", "aux", "penalty"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field), rtol=1e-4, atol=1e-6, msg=field)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def planted_data(n: int = 1500, seed: int = 0) -> torch.Tensor:
    """States that are sums of 2 of 12 random unit rank-1 atoms, coefficients in [0.5, 1.5]."""
    return planted_rank1_states(12, D_K, D_V, n, per_state=2, low=0.5, high=1.5, seed=seed)[1]


def train(sparsity: str, data: torch.Tensor, seed: int = 0, **trainer) -> tuple[WriteSAETrainer, float]:
    """(trained trainer, validation MSE before training)."""
    train_src, val_src = TensorSource(data, seed=0).split(0.2, seed=1)
    sae = WriteTrainingSAE(WriteTrainingSAEConfig.build(d_k=D_K, d_v=D_V, d_sae=D_SAE * 2, sparsity=sparsity,
                                                        jumprelu_init_threshold=0.05), seed=seed)  # fmt: skip
    cfg = TrainerConfig(batch_size=64, epochs=12, lr=1e-2, lr_min=1e-3, warmup_steps=5, progress=False,
                        jumprelu_bandwidth=0.1, jumprelu_bandwidth_final=0.1, **trainer)  # fmt: skip
    run = WriteSAETrainer(sae, train_src, cfg, val=val_src)
    before = run.validate()["val_mse"]
    run.fit()
    return run, before


@pytest.mark.parametrize(("sparsity", "key", "small", "large"),
                         [("jumprelu", "jumprelu_coefficient", 1e-4, 3e-3), ("gated", "gated_coefficient", 1e-4, 3e-2)])
def test_training_on_a_planted_dictionary_lowers_mse_and_l0_follows_lambda(sparsity, key, small, large) -> None:
    data = planted_data()
    weak, before = train(sparsity, data, **{key: small})
    strong, _ = train(sparsity, data, **{key: large})
    w, s = weak.last_val, strong.last_val
    print(f"{sparsity}: val MSE {before:.4g} -> {w['val_mse']:.4g} (lambda {small}), {s['val_mse']:.4g} "
          f"(lambda {large}); L0 {w['val_l0']:.2f} vs {s['val_l0']:.2f}")  # fmt: skip
    assert w["val_mse"] < 0.5 * before
    assert s["val_l0"] < w["val_l0"]


def test_input_scaling_trains_thresholds_in_the_data_units(tmp_path) -> None:
    """JumpReLU on S and on s*S with input_scaling: the same atoms; thresholds, biases and codes in each
    data's own units (log_threshold moved by log s), and the saved SAE gives the scaled codes on raw data."""
    s = 2.0**-8  # a power of two: both runs see bit-identical scaled data
    data = planted_data(400)
    runs = []
    for scale in (1.0, s):
        sae = WriteTrainingSAE(WriteTrainingSAEConfig.build(d_k=D_K, d_v=D_V, d_sae=D_SAE, sparsity="jumprelu",
                                                            jumprelu_init_threshold=0.05), seed=0)  # fmt: skip
        cfg = TrainerConfig(batch_size=50, epochs=2, lr=1e-2, progress=False, input_scaling="unit_mean_square",
                            jumprelu_bandwidth=0.1, out_dir=tmp_path / str(scale))  # fmt: skip
        run = WriteSAETrainer(sae, data * scale, cfg, val=data[:100] * scale)
        run.fit()
        runs.append(run)
    unit, tiny = (r.sae.state_dict() for r in runs)
    for name, tensor in unit.items():
        if name == "log_threshold":
            torch.testing.assert_close(tiny[name], tensor + math.log(s), rtol=1e-5, atol=1e-5)
        else:
            factor = s if name in ("b_enc", "b_dec") else 1.0
            torch.testing.assert_close(tiny[name], tensor * factor, rtol=1e-5, atol=1e-7 * factor, msg=name)
    loaded = SAE.load_from_disk(tmp_path / str(s) / "final")
    x = data[:20]
    torch.testing.assert_close(loaded.encode(x * s), runs[0].sae.eval().encode(x) * s, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("sparsity", ["jumprelu", "gated"])
@pytest.mark.parametrize("variant", ["bilinear", "bilinear_flat"])
def test_saelens_round_trip_and_folds_keep_the_codes(tmp_path, sparsity: str, variant: str) -> None:
    trained = make(sparsity, variant, training=True).eval()
    states = torch.randn(30, D_K, D_V)
    codes = trained.encode(states)
    trained.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert type(loaded) is WriteSAE and loaded.cfg.sparsity == sparsity
    assert torch.equal(loaded.encode(states), codes)
    # A scaled SAE folded to raw units: the codes of the raw data are the scaled codes divided by c.
    c = 8.0
    folded = make(sparsity, variant)
    folded.load_state_dict(trained.state_dict())
    folded.fold_activation_norm_scaling_factor(c)
    got = folded.encode(states / c)
    assert torch.equal(got != 0, codes != 0)
    torch.testing.assert_close(got, codes / c, rtol=1e-5, atol=1e-7)
    # Per-atom rules fold unequal atom norms exactly (TopK refuses them).
    with torch.no_grad():
        decoder = loaded.W_dec if variant == "bilinear_flat" else loaded.W_dec_value
        decoder.mul_(torch.linspace(0.5, 3.0, D_SAE).reshape(-1, *[1] * (decoder.dim() - 1)))
    before_codes, before_recon = loaded.encode(states), loaded.decode(loaded.encode(states))
    norms = loaded.get_W_dec_norm().clone()
    loaded.fold_W_dec_norm()
    torch.testing.assert_close(loaded.get_W_dec_norm(), torch.ones(D_SAE))
    torch.testing.assert_close(loaded.encode(states), before_codes * norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.decode(loaded.encode(states)), before_recon, rtol=1e-5, atol=1e-5)


def _revalidated(config, **changes):
    """``config`` with ``changes`` set after construction, validated again (the test suite's type checker
    would refuse a bad Literal value before the config's own check could name the fix)."""
    for name, value in changes.items():
        setattr(config, name, value)
    config.__post_init__()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TrainerConfig(jumprelu_coefficient=-1e-5), "jumprelu_coefficient must be a number >= 0"),
        (lambda: TrainerConfig(gated_coefficient=float("nan")), "gated_coefficient must be a number >= 0"),
        (lambda: TrainerConfig(jumprelu_bandwidth_final=0.0), "jumprelu_bandwidth_final must be a number > 0"),
        (lambda: _revalidated(TrainerConfig(), gate="sigmoid"), r"gate must be one of \('hard', 'soft_sigmoid'\)"),
        (lambda: TrainerConfig(gate_temperature=-0.1), "gate_temperature must be a number > 0"),
        (lambda: WriteTrainingSAEConfig.build(d_k=2, d_v=2, d_sae=4, sparsity="jumprelu", jumprelu_init_threshold=0.0),
         "jumprelu_init_threshold must be a positive"),
        (lambda: _revalidated(WriteSAEConfig.build(d_k=2, d_v=2, d_sae=4, k=2), sparsity="relu"),
         "'jumprelu', 'gated'"),
        (lambda: FamiliesConfig(sparsities=("topk", "gate")), "sparsities must be a non-empty subset"),
    ],
)
def test_bad_settings_name_the_fix(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_cli_refuses_sparsity_flags_of_sparsities_it_does_not_train(tmp_path, capsys) -> None:
    from writesae.cli import main

    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    status = main(["train", str(store), "--layer", "0", "--head", "0", "--jumprelu-coefficient", "1e-3",
                   "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 2
    assert "--jumprelu-coefficient applies to jumprelu SAEs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    status = main(["families", "tiny-random:qwen3.5", "--store", str(store), "--sparsities", "topk", "jumprelu",
                   "--gate", "soft_sigmoid", "--out", str(tmp_path / "fam")])  # fmt: skip
    assert status == 2
    assert "--gate applies to gated SAEs" in capsys.readouterr().err


def test_bandwidth_is_cosine_annealed_over_the_run() -> None:
    cfg = TrainerConfig(jumprelu_bandwidth=1e-3, jumprelu_bandwidth_final=1e-5)
    assert jumprelu_bandwidth(0, 101, cfg) == pytest.approx(1e-3)
    assert jumprelu_bandwidth(50, 101, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert jumprelu_bandwidth(100, 101, cfg) == pytest.approx(1e-5)


def test_sweep_cells_keep_only_their_sparsity_settings() -> None:
    """A gate setting splits gated cells, not TopK ones, and leaves a TopK cell's identity as it was."""
    base = {"store": "s", "fixed": {"layer": 0, "head": 0}}
    grid = {"sparsity": ["topk", "gated"], "gate": ["hard", "soft_sigmoid"]}
    cells = SweepGrid.from_dict({**base, "grid": grid}).cells()
    assert [(c.settings["sparsity"], c.settings.get("gate")) for c in cells] == [
        ("topk", None), ("gated", "hard"), ("gated", "soft_sigmoid")]
    (plain,) = SweepGrid.from_dict({**base, "grid": {"sparsity": ["topk"]}}).cells()
    assert cells[0].digest == plain.digest
    assert "jumprelu_coefficient" not in plain.settings and "gated_coefficient" in cells[1].settings


def test_families_with_jumprelu_and_gated_record_each_family(tmp_path) -> None:
    torch.manual_seed(0)
    model, _ = tiny_pair("tiny-random:qwen3.5")
    layer, head = model.cfg.recurrent_layers[0], 1
    config = FamiliesConfig(variants=("bilinear",), sparsities=("topk", "jumprelu", "gated"), seeds=(0,), d_sae=16,
                            k=2, epochs=2, substitution=None,
                            trainer={"batch_size": 32, "warmup_steps": 1, "input_scaling": "unit_mean_square",
                                     "jumprelu_bandwidth": 0.1, "jumprelu_init_threshold": 0.01,
                                     "gate": "soft_sigmoid"})  # fmt: skip
    result = run_families(model, random_tokens(2, 8, seed=9), train_tokens=random_tokens(6, 16, seed=8), layer=layer,
                          head=head, config=config, out_dir=tmp_path, verbose=False)  # fmt: skip
    records = {r.sparsity: r for r in result.records}
    assert sorted(records) == ["gated", "jumprelu", "topk"] and len(result.records) == 3
    from writesae.store import WriteStore

    val = WriteStore(tmp_path / "store").read(layer, head, "val")["states"].float()
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    for sparsity, r in records.items():
        assert r.family == f"bilinear/{sparsity}"
        (folder,) = [p for p in (tmp_path / "cells").iterdir() if f"_{sparsity}_" in p.name]
        sae = WriteSAE.load_from_disk(folder / "sae")
        assert sae.cfg.sparsity == sparsity
        assert r.n_parameters == d_k * d_v + r.d_sae * parameters_per_atom("bilinear", d_k, d_v, sparsity=sparsity)
        with torch.no_grad():
            codes = sae.encode(val)
            mse = float((sae.decode(codes) - val).pow(2).mean())
        assert r.val_mse == pytest.approx(mse, rel=1e-3)
        assert r.val_l0 == pytest.approx(float((codes != 0).sum(-1).double().mean()), rel=1e-6)
    assert {row["family"] for row in result.summary["families"]} == {f"bilinear/{s}" for s in records}
    assert "bilinear/gated" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("sparsity", ["jumprelu", "gated"])
def test_resampled_atoms_restart_their_sparsity_parameters(sparsity: str) -> None:
    """JumpReLU: a resampled atom's log-threshold becomes the alive atoms' mean; gated: r_mag = b_mag = 0; the
    other atoms and their Adam moments are untouched."""
    from writesae.resample import resample_dead_atoms

    sae = make(sparsity, training=True)
    names = ("log_threshold",) if sparsity == "jumprelu" else ("r_mag", "b_mag")
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.compute_loss(torch.randn(8, D_K, D_V), sparsity_loss=SparsityLoss(1e-2, bandwidth=1.0)).loss.backward()
    optimizer.step()
    before = {n: getattr(sae, n).detach().clone() for n in names}
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4]] = True
    g = torch.Generator().manual_seed(0)
    n = resample_dead_atoms(sae, optimizer, dead, torch.randn(16, D_K, D_V), torch.rand(16), g)
    assert n == 2
    for name in names:
        got = getattr(sae, name).detach()
        want = before[name][~dead].mean() if name == "log_threshold" else torch.tensor(0.0)
        torch.testing.assert_close(got[dead], want.expand(2))
        assert torch.equal(got[~dead], before[name][~dead])
        moments = optimizer.state[getattr(sae, name)]
        assert not moments["exp_avg"][dead].any() and moments["exp_avg"][~dead].any()
