"""Paper-checkpoint converter, on synthetic checkpoints in the reference code's layout.

Their equations (reference code, layout K x V, S not centred before encoding):
    bilinear: pre_i = sum_r V_enc[i,r]^T S W_enc[i,r] + b_enc[i]      (tied: V_dec, W_dec; bilinear_flat too)
    rank1:    pre   = encoder.weight @ vec(S) + encoder.bias
    flat:     pre   = encoder.weight @ vec(S) + encoder.bias
    a = ReLU of the k largest pre per sample
    S_hat = sum_i a_i sum_r V_dec[i,r] W_dec[i,r]^T + bias           (rank1: V, W; flat, bilinear_flat: decoder(a))
"""

from pathlib import Path

import jaxtyping
import pytest
import torch

with jaxtyping.install_import_hook("writesae", "beartype.beartype"):
    from writesae import CheckpointError, WriteSAE, load_paper_checkpoint

D_K, D_V, N, K = 6, 5, 12, 3


def paper_checkpoint(sae_type: str, rank: int = 2, two_d: bool = False) -> dict:
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    factor = (lambda d: r(N, d)) if two_d else (lambda d: r(N, rank, d))
    if sae_type == "bilinear":
        state = {"V_enc": factor(D_K), "W_enc": factor(D_V), "b_enc": r(N), "V_dec": factor(D_K), "W_dec": factor(D_V), "bias": r(D_K, D_V)}
    elif sae_type == "bilinear_tied":
        state = {"b_enc": r(N), "V_dec": factor(D_K), "W_dec": factor(D_V), "bias": r(D_K, D_V)}
    elif sae_type == "bilinear_flat":
        state = {"V_enc": factor(D_K), "W_enc": factor(D_V), "b_enc": r(N),
                 "decoder.weight": r(D_K * D_V, N), "decoder.bias": r(D_K * D_V)}  # fmt: skip
    elif sae_type == "rank1":
        state = {"encoder.weight": r(N, D_K * D_V), "encoder.bias": r(N), "V": factor(D_K), "W": factor(D_V), "bias": r(D_K, D_V)}
    else:
        state = {"encoder.weight": r(N, D_K * D_V), "encoder.bias": r(N), "decoder.weight": r(D_K * D_V, N), "decoder.bias": r(D_K * D_V)}
    state["steps_since_active"] = torch.zeros(N)
    config = {"sae_type": sae_type, "layer": 9, "head": 4, "n_features": N, "d_k": D_K, "d_v": D_V, "k": K, "rank": rank, "use_batchtopk": False}
    return {"model_state_dict": state, "config": config, "epoch": 3, "step": 100, "val_mse": 1e-5}


def their_forward(ckpt: dict, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    st = {k: v.double() for k, v in ckpt["model_state_dict"].items()}
    t = ckpt["config"]["sae_type"]
    s = s.double()
    b = s.shape[0]

    def f3(x):
        return x[:, None, :] if x.ndim == 2 else x

    if t in ("bilinear", "bilinear_tied", "bilinear_flat"):
        ve, we = (st["V_enc"], st["W_enc"]) if t != "bilinear_tied" else (st["V_dec"], st["W_dec"])
        ve, we = f3(ve), f3(we)
        pre = torch.stack([sum(ve[i, j] @ s_ @ we[i, j] for j in range(ve.shape[1])) for s_ in s for i in range(N)]).reshape(b, N) + st["b_enc"]
    else:
        pre = s.reshape(b, -1) @ st["encoder.weight"].T + st["encoder.bias"]
    top = pre.topk(K, dim=-1)
    a = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
    if t in ("flat", "bilinear_flat"):
        recon = (a @ st["decoder.weight"].T + st["decoder.bias"]).reshape(b, D_K, D_V)
    else:
        vd, wd = (st["V_dec"], st["W_dec"]) if t != "rank1" else (st["V"], st["W"])
        vd, wd = f3(vd), f3(wd)
        atoms = torch.einsum("irk,irv->ikv", vd, wd)
        recon = torch.einsum("bi,ikv->bkv", a, atoms) + st["bias"]
    return a, recon


@pytest.mark.parametrize(
    ("sae_type", "rank", "two_d"),
    [("bilinear", 2, False), ("bilinear", 1, True), ("bilinear_tied", 2, False), ("rank1", 2, False), ("rank1", 1, True), ("flat", 1, False),
     ("bilinear_flat", 2, False), ("bilinear_flat", 1, True)],  # fmt: skip
)
def test_converted_checkpoint_matches_their_equations(tmp_path: Path, sae_type: str, rank: int, two_d: bool) -> None:
    ckpt = paper_checkpoint(sae_type, rank, two_d)
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    sae = load_paper_checkpoint(path, hook_name="blocks.9.linear_attn.hook_state", model_name="Qwen/Qwen3.5-0.8B")
    assert isinstance(sae, WriteSAE)
    assert sae.cfg.variant == {"rank1": "matrix"}.get(sae_type, sae_type)
    assert sae.cfg.rank == rank and sae.cfg.k == K and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_head_index == 4 and sae.cfg.metadata.paper_layer == 9
    states = torch.randn(4, D_K, D_V)
    codes, recon = their_forward(ckpt, states)
    torch.testing.assert_close(sae.encode(states).double(), codes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae(states).double(), recon, rtol=1e-5, atol=1e-4)
    # a converted SAE saves and reloads like any other
    sae.save_model(tmp_path / "converted")
    again = WriteSAE.load_from_disk(tmp_path / "converted")
    assert torch.equal(again(states), sae(states))


def test_dict_input_and_batchtopk_flag() -> None:
    ckpt = paper_checkpoint("bilinear")
    ckpt["config"]["use_batchtopk"] = True
    sae = load_paper_checkpoint(ckpt)
    assert sae.cfg.sparsity == "batchtopk" and sae.cfg.batchtopk_inference == "topk"


def test_refuses_pickled_modules_and_bad_layouts(tmp_path: Path) -> None:
    torch.save({"sae": torch.nn.Linear(2, 2), "config": {}}, tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="full-module pickle"):
        load_paper_checkpoint(tmp_path / "module.pt")
    ckpt = paper_checkpoint("bilinear")
    del ckpt["model_state_dict"]["V_dec"]
    with pytest.raises(CheckpointError, match="needs 'V_dec'"):
        load_paper_checkpoint(ckpt)
    ckpt = paper_checkpoint("bilinear")
    ckpt["config"]["sae_type"] = "bilinear_relu"
    with pytest.raises(CheckpointError, match="not convertible"):
        load_paper_checkpoint(ckpt)


def test_a_bilinear_flat_checkpoint_is_recognised_by_its_keys() -> None:
    """Without ``config["sae_type"]``: matched-filter factors plus a dense ``decoder`` are BilinearEncoderFlatSAE's."""
    ckpt = paper_checkpoint("bilinear_flat")
    del ckpt["config"]["sae_type"]
    sae = load_paper_checkpoint(ckpt)
    assert sae.cfg.variant == "bilinear_flat" and sae.cfg.rank == 2
    ckpt = paper_checkpoint("bilinear")
    del ckpt["config"]["sae_type"]
    assert load_paper_checkpoint(ckpt).cfg.variant == "bilinear"


@pytest.mark.parametrize("sae_type", ["bilinear_jumprelu", "bilinear_gated"])
def test_jumprelu_and_gated_checkpoints_convert_to_their_sparsities(sae_type: str) -> None:
    """Their keys (BilinearJumpReLUSAE: ``log_threshold``; BilinearGatedSAE: ``b_gate``, ``b_mag``, ``r_mag``),
    recognised with or without ``sae_type``; codes against their equations with the hard gate:
        jumprelu: z = sum_r V_enc^T S W_enc + b_enc,  a = z 1[z > exp(log_threshold)]
        gated:    s = sum_r V_enc^T S W_enc,  a = 1[s + b_gate > 0] ReLU(exp(r_mag) s + b_mag)
    (their gated code keeps sigmoid((s + b_gate) / tau) at inference; the converted SAE is hard-gated)."""
    ckpt = paper_checkpoint("bilinear")
    state, g = ckpt["model_state_dict"], torch.Generator().manual_seed(3)
    if sae_type == "bilinear_jumprelu":
        state["log_threshold"] = torch.rand(N, generator=g) * 2 - 1
    else:
        state["b_gate"] = state.pop("b_enc")
        state["b_mag"], state["r_mag"] = torch.randn(N, generator=g), torch.randn(N, generator=g) * 0.3
        ckpt["config"]["gate_tau"] = 0.1
    del ckpt["config"]["sae_type"]
    sae = load_paper_checkpoint(ckpt)
    assert sae.cfg.sparsity == sae_type.removeprefix("bilinear_") and sae.cfg.variant == "bilinear"
    st = {k: v.double() for k, v in state.items()}
    s = torch.randn(16, D_K, D_V).double()
    shared = torch.einsum("irk,bkv,irv->bi", st["V_enc"], s, st["W_enc"])
    if sae_type == "bilinear_jumprelu":
        z = shared + st["b_enc"]
        want = z * (z > st["log_threshold"].exp())
    else:
        want = (shared + st["b_gate"] > 0) * (st["r_mag"].exp() * shared + st["b_mag"]).clamp(min=0)
        assert sae.cfg.metadata.paper_gate_tau == 0.1
    assert 0 < (want != 0).double().mean() < 1
    torch.testing.assert_close(sae.encode(s.float()).double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(CheckpointError, match="drop sparsity"):
        load_paper_checkpoint(ckpt, sparsity="topk")
