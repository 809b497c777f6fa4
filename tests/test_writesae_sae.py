"""WriteSAE encode/decode against dense references written here from the paper's equations.

Reference (float64, one head, S in [d_k, d_v]):
    c_in  = input_mean + b_dec * apply_b_dec_to_input,   c_out = b_dec + input_mean
    E_i   = sum_r ek_ir ek'_ir^T (bilinear, bilinear_flat), dec factors (tied), W_enc[:, i] reshaped (dense)
    pre_i = <E_i, S - c_in> + b_enc_i
    a     = ReLU of the k largest pre_i per sample, zero elsewhere
    S_hat = sum_i a_i A_i + c_out,   A_i = sum_r v_ir w_ir^T (factors) or W_dec[i] reshaped (flat, bilinear_flat)
"""

import jaxtyping
import pytest
import torch
from helpers import LargestTensor

with jaxtyping.install_import_hook("writesae", "beartype.beartype"):
    import writesae
    from writesae import WriteSAE, WriteSAEConfig

D_K, D_V, D_SAE = 6, 5, 24
VARIANTS = ["bilinear", "flat", "matrix", "bilinear_tied", "bilinear_flat"]
DENSE_DECODERS = ("flat", "bilinear_flat")


def make_sae(variant: str = "bilinear", rank: int = 1, **kw) -> WriteSAE:
    torch.manual_seed(0)
    rank = 1 if variant == "flat" else rank
    sae = WriteSAE(WriteSAEConfig.build(d_k=D_K, d_v=D_V, d_sae=D_SAE, k=4, variant=variant, rank=rank, **kw))
    with torch.no_grad():  # non-zero biases and mean, so every offset term is exercised
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        if kw.get("input_mean") == "fixed":
            sae.input_mean.normal_(0, 0.5)
    return sae


def reference(sae: WriteSAE, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [B, n], reconstructions [B, d_k, d_v]) in float64, written from the equations."""
    cfg = sae.cfg
    p = {name: t.detach().double() for name, t in sae.state_dict().items()}
    s = states.double()
    mean = p.get("input_mean", torch.zeros(cfg.d_k, cfg.d_v, dtype=torch.float64))
    c_in = mean + (p["b_dec"] if cfg.apply_b_dec_to_input else 0)
    c_out = p["b_dec"] + mean
    n = cfg.d_sae
    if cfg.variant in ("flat", "matrix"):
        enc = [p["W_enc"][:, i].reshape(cfg.d_k, cfg.d_v) for i in range(n)]
    else:
        ek, ev = (p["W_enc_key"], p["W_enc_value"]) if "W_enc_key" in p else (p["W_dec_key"], p["W_dec_value"])
        enc = [sum(torch.outer(ek[i, r], ev[i, r]) for r in range(cfg.rank)) for i in range(n)]
    if cfg.variant in DENSE_DECODERS:
        atoms = [p["W_dec"][i].reshape(cfg.d_k, cfg.d_v) for i in range(n)]
    else:
        atoms = [sum(torch.outer(p["W_dec_key"][i, r], p["W_dec_value"][i, r]) for r in range(cfg.rank)) for i in range(n)]
    pre = torch.stack([((s - c_in) * e).sum((-1, -2)) for e in enc], -1) + p["b_enc"]
    order = pre.argsort(-1, descending=True)[:, : cfg.k]
    codes = torch.zeros_like(pre)
    codes.scatter_(-1, order, pre.gather(-1, order).clamp(min=0))
    recon = torch.einsum("bi,ikv->bkv", codes, torch.stack(atoms)) + c_out
    return codes, recon


# flat atoms are dense, so rank applies to the other variants only
VARIANT_RANKS = [(v, r) for v in VARIANTS for r in (1, 3) if v != "flat" or r == 1]


@pytest.mark.parametrize(("variant", "rank"), VARIANT_RANKS)
@pytest.mark.parametrize("opts", [{}, {"apply_b_dec_to_input": False}, {"input_mean": "fixed"}])
def test_encode_decode_match_dense_reference(variant: str, rank: int, opts: dict) -> None:
    sae = make_sae(variant, rank, **opts)
    states = torch.randn(7, D_K, D_V)
    codes, recon = reference(sae, states)
    torch.testing.assert_close(sae.encode(states).double(), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(states).double(), recon, rtol=1e-5, atol=1e-5)
    # flat layout in -> flat layout out, same numbers
    flat = states.reshape(7, -1)
    torch.testing.assert_close(sae.encode(flat).double(), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(flat).double(), recon.reshape(7, -1), rtol=1e-5, atol=1e-5)
    # the dense views are SAELens' W_enc / W_dec
    c_in = sae._input_offset()
    pre = (flat - (0 if c_in is None else c_in.reshape(-1))) @ sae.W_enc + sae.b_enc
    top = torch.topk(pre, 4, dim=-1).indices
    torch.testing.assert_close(pre.gather(-1, top).clamp(min=0).double(), codes.gather(-1, top), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.reshape(D_SAE, D_K, D_V), sae.atom_matrices(), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_factor_pair_encode_equals_dense_encode(variant: str) -> None:
    sae = make_sae(variant, rank=2)
    key, value = torch.randn(3, 4, D_K), torch.randn(3, 4, D_V)
    writes = key[..., :, None] * value[..., None, :]
    dense_codes = sae.encode(writes)
    assert dense_codes.shape == (3, 4, D_SAE)
    torch.testing.assert_close(sae.encode((key, value)), dense_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode_factors(key, value), dense_codes, rtol=1e-5, atol=1e-5)
    out = sae((key, value))
    assert out.shape == (3, 4, D_K, D_V)
    torch.testing.assert_close(out, sae(writes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["bilinear", "bilinear_tied", "bilinear_flat"])
def test_factor_pair_encode_builds_no_per_sample_matrix(variant: str) -> None:
    b, d = 512, 32
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig.build(d_k=d, d_v=d, d_sae=16, k=4, variant=variant, input_mean="fixed"))
    key, value = torch.randn(b, d), torch.randn(b, d)
    with torch.no_grad(), LargestTensor() as rec:
        sae.encode((key, value))
    assert rec.largest <= b * d  # the inputs' own size; the writes would be b * d * d


@pytest.mark.parametrize("variant", ["flat", "matrix"])
def test_dense_encoder_builds_writes_in_bounded_chunks(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b, d = 512, 32
    monkeypatch.setattr(writesae.factors, "_CHUNK_ELEMENTS", 64 * d * d)
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig.build(d_k=d, d_v=d, d_sae=16, k=4, variant=variant))
    key, value = torch.randn(b, d), torch.randn(b, d)
    with torch.no_grad(), LargestTensor() as rec:
        codes = sae.encode((key, value))
    assert rec.largest <= 64 * d * d
    torch.testing.assert_close(codes, sae.encode(key[:, :, None] * value[:, None, :]), rtol=1e-5, atol=1e-5)


def test_bilinear_score_of_rank1_input_is_product_of_dots() -> None:
    """The matched-filter score of k u^T is (v_i . k)(u . w_i) (no bias, no centering)."""
    sae = make_sae("bilinear", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.b_enc.zero_()
    key, value = torch.randn(D_K), torch.randn(D_V)
    pre = {}
    sae.hook_sae_acts_pre.add_hook(lambda t, hook: pre.setdefault("x", t.clone()))
    sae.encode((key[None], value[None]))
    expected = (sae.W_enc_key[:, 0] @ key) * (sae.W_enc_value[:, 0] @ value)
    torch.testing.assert_close(pre["x"][0], expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_bilinear_flat_is_a_matched_filter_over_a_dense_decoder() -> None:
    """bilinear_flat, written out by hand: pre_i = sum_r ek_ir^T (S - b_dec) ev_ir + b_enc_i, and
    decode(a) = a W_dec + vec(b_dec) (the paper's W_dec^T a + b_dec with W_dec [d_in, n])."""
    sae = make_sae("bilinear_flat", rank=2)
    assert {n for n, _ in sae.named_parameters()} == {"W_enc_key", "W_enc_value", "W_dec", "b_enc", "b_dec"}
    assert sae.W_enc_key.shape == (D_SAE, 2, D_K) and sae.W_dec.shape == (D_SAE, D_K * D_V)
    # initialised as the reference code does: unit-norm encoder factor rows and decoder rows
    for p in (sae.W_enc_key, sae.W_enc_value, sae.W_dec):
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(p.shape[:-1]))
    s = torch.randn(3, D_K, D_V, dtype=torch.float64)
    ek, ev = sae.W_enc_key.double(), sae.W_enc_value.double()
    b_dec, b_enc = sae.b_dec.double(), sae.b_enc.double()
    pre = torch.tensor([[float(sum(ek[i, r] @ (s[b] - b_dec) @ ev[i, r] for r in range(2)) + b_enc[i])
                         for i in range(D_SAE)] for b in range(3)], dtype=torch.float64)  # fmt: skip
    seen = {}
    sae.hook_sae_acts_pre.add_hook(lambda t, hook: seen.setdefault("pre", t.clone()))
    codes = sae.encode(s.float())
    torch.testing.assert_close(seen["pre"].double(), pre, rtol=1e-5, atol=1e-5)
    top = pre.topk(4, dim=-1)
    hand_codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
    torch.testing.assert_close(codes.double(), hand_codes, rtol=1e-5, atol=1e-5)
    a = torch.rand(3, D_SAE, dtype=torch.float64)  # any code, dense ones too
    want = a @ sae.W_dec.double() + b_dec.reshape(-1)
    torch.testing.assert_close(sae.decode(a.float(), layout="flat").double(), want, rtol=1e-5, atol=1e-5)
    # a dense-decoder atom is its W_dec row: no factors to hand out, the matrix instead
    torch.testing.assert_close(sae.atom_matrices([5])[0], sae.W_dec[5].reshape(D_K, D_V), rtol=0, atol=0)
    assert sae.encoder_factors[0] is sae.W_enc_key
    with pytest.raises(AttributeError, match="'bilinear_flat' has dense atoms"):
        _ = sae.atom_value
    torch.testing.assert_close(sae.get_W_dec_norm(), sae.W_dec.norm(dim=-1))


def test_decode_layout_follows_last_encode() -> None:
    sae = make_sae()
    states = torch.randn(2, D_K, D_V)
    assert sae.decode(sae.encode(states)).shape == (2, D_K, D_V)
    assert sae.decode(sae.encode(states.reshape(2, -1))).shape == (2, D_K * D_V)
    assert sae.decode(sae.encode(states), layout="flat").shape == (2, D_K * D_V)


def test_batchtopk_inference_rules() -> None:
    states = torch.randn(16, D_K, D_V)
    per_sample = make_sae(sparsity="batchtopk")
    assert ((per_sample.encode(states) != 0).sum(-1) <= 4).all()
    batch = make_sae(sparsity="batchtopk", batchtopk_inference="batch")
    counts = (batch.encode(states) != 0).sum(-1)
    assert int(counts.sum()) <= 4 * 16 and counts.max() > counts.min()
    thresh = make_sae(sparsity="batchtopk", batchtopk_inference="threshold")
    with torch.no_grad():
        thresh.topk_threshold.fill_(0.2)
    codes = thresh.encode(states)
    assert ((codes == 0) | (codes > 0.2)).all() and (codes > 0).any()


def test_hooks_fire_with_saelens_names() -> None:
    sae = make_sae()
    states = torch.randn(3, D_K, D_V)
    out, cache = sae.run_with_cache(states)
    names = {"hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"}
    assert names <= set(cache.keys())
    assert cache["hook_sae_input"].shape == (3, D_K, D_V)
    assert cache["hook_sae_acts_post"].shape == (3, D_SAE)
    torch.testing.assert_close(cache["hook_sae_recons"], out)
    torch.testing.assert_close(cache["hook_sae_output"], out)


def test_input_hook_sees_materialised_factor_pair() -> None:
    sae = make_sae()
    key, value = torch.randn(2, D_K), torch.randn(2, D_V)
    seen = []
    sae.hook_sae_input.add_hook(lambda t, hook: seen.append(t.clone()))
    sae.encode((key, value))
    torch.testing.assert_close(seen[0], key[:, :, None] * value[:, None, :])


def test_feature_edit_through_hook_changes_reconstruction() -> None:
    sae = make_sae()
    states = torch.randn(4, D_K, D_V)
    codes = sae.encode(states)
    atom = int(codes[0].argmax())

    def ablate(acts: torch.Tensor, hook) -> torch.Tensor:
        acts[..., atom] = 0.0  # in-place edit, as users write them
        return acts

    with sae.hooks(fwd_hooks=[("hook_sae_acts_post", ablate)]):
        edited = sae(states)
    expected = sae(states) - codes[:, atom, None, None] * sae.atom_matrices([atom])[0]
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["matrix", "flat", "factors"])
def test_error_term_gives_input_exactly_and_passes_edits(variant: str, form: str) -> None:
    sae = make_sae(variant, rank=2)
    key, value = torch.randn(5, D_K), torch.randn(5, D_V)
    writes = key[:, :, None] * value[:, None, :]
    x = {"matrix": writes, "flat": writes.reshape(5, -1), "factors": (key, value)}[form]
    target = writes if form != "flat" else writes.reshape(5, -1)
    out = sae(x, use_error_term=True)
    assert torch.equal(out, target)  # bit for bit
    codes = sae.encode(x)
    atom = int(codes[0].argmax())

    def ablate(acts: torch.Tensor, hook) -> torch.Tensor:
        acts[..., atom] = 0.0
        return acts

    with sae.hooks(fwd_hooks=[("hook_sae_acts_post", ablate)]):
        edited = sae(x, use_error_term=True)
    delta = -(codes[:, atom, None, None] * sae.atom_matrices([atom])[0])
    torch.testing.assert_close(edited, target + delta.reshape(target.shape), rtol=1e-5, atol=1e-5)
    # editing the error term (zero-ablation) leaves the plain reconstruction
    with sae.hooks(fwd_hooks=[("hook_sae_error", lambda t, hook: torch.zeros_like(t))]):
        no_error = sae(x, use_error_term=True)
    torch.testing.assert_close(no_error, sae(x), rtol=1e-5, atol=1e-5)


def test_error_term_gradient_flows_through_reconstruction_only() -> None:
    """As in SAELens: d output / d input is the SAE's Jacobian, not the identity."""
    sae = make_sae("bilinear")
    x = torch.randn(2, D_K, D_V, requires_grad=True)
    sae(x).sum().backward()
    grad_plain = x.grad.clone()
    x.grad = None
    with pytest.warns(DeprecationWarning):  # SAELens' attribute, still honoured
        sae.use_error_term = True
    out = sae(x)
    assert torch.equal(out, x.detach())
    out.sum().backward()
    torch.testing.assert_close(x.grad, grad_plain)


def test_factor_views_and_atoms() -> None:
    sae = make_sae("bilinear", rank=2)
    assert sae.atom_key.shape == (D_SAE, 2, D_K) and sae.atom_value.shape == (D_SAE, 2, D_V)
    assert sae.atom_key is sae.W_dec_key  # the parameter itself: edits stick
    idx = [3, 0]
    manual = torch.stack([sae.W_dec_key[i].T @ sae.W_dec_value[i] for i in idx])
    torch.testing.assert_close(sae.atom_matrices(idx), manual)
    torch.testing.assert_close(sae.get_W_dec_norm(), sae.atom_matrices().flatten(1).norm(dim=-1))
    assert "W_dec" not in dict(sae.named_parameters())
    with pytest.raises(AttributeError, match="read-only dense view"):
        sae.W_dec = torch.zeros(D_SAE, D_K * D_V)
    flat = make_sae("flat")
    assert "W_dec" in dict(flat.named_parameters())
    with pytest.raises(AttributeError, match="no factors"):
        _ = flat.atom_key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opts", [{}, {"input_mean": "fixed"}, {"sparsity": "batchtopk", "batchtopk_inference": "threshold"}])
def test_folded_scale_acts_on_raw_data_like_the_scaled_sae(variant: str, opts: dict) -> None:
    """An SAE trained on c*S, folded, gives on raw S the codes and reconstruction divided by c."""
    c = 37.0
    trained = make_sae(variant, **opts)
    if "sparsity" in opts:
        with torch.no_grad():
            trained.topk_threshold.fill_(0.2)
    states = torch.randn(16, D_K, D_V) / c
    want_codes = trained.encode(c * states)  # encode itself is checked against the reference above
    want_recon = trained.decode(want_codes)
    folded = make_sae(variant, **opts)
    folded.load_state_dict(trained.state_dict())
    folded.fold_activation_norm_scaling_factor(c)
    got_codes = folded.encode(states)
    assert torch.equal(got_codes != 0, want_codes != 0)  # the same atoms are kept
    torch.testing.assert_close(got_codes, want_codes / c, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(folded.decode(got_codes), want_recon / c, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(folded.get_W_dec_norm(), trained.get_W_dec_norm())  # atoms untouched
    with pytest.raises(ValueError, match="positive"):
        folded.fold_activation_norm_scaling_factor(0.0)


def test_whitening_would_break_rank_structure_and_refuses() -> None:
    with pytest.raises(NotImplementedError, match="rank"):
        make_sae().fold_activation_whitening(torch.zeros(30), torch.eye(30), torch.eye(30))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(("variant", "rank", "sparsity"), [("bilinear", 1, "topk"), ("bilinear", 2, "batchtopk"), ("matrix", 1, "topk"), ("flat", 1, "topk"),
                                                          ("bilinear_flat", 2, "topk")])  # fmt: skip
@torch.no_grad()
def test_fold_w_dec_norm_keeps_saelens_contract_where_exact(variant, rank, sparsity, training) -> None:
    """Atoms of equal norm fold exactly: unit atoms, codes times the old norm, same reconstruction."""
    sae = make_sae(variant, rank, sparsity=sparsity)
    if training:
        trainable = writesae.WriteTrainingSAE(writesae.WriteTrainingSAEConfig.build(
            d_k=D_K, d_v=D_V, d_sae=D_SAE, k=4, variant=variant, rank=rank, sparsity=sparsity))
        trainable.load_state_dict(sae.state_dict())
        sae = trainable.eval()
    if sparsity == "batchtopk":
        sae.topk_threshold.fill_(0.05)
    decoder = sae.W_dec if variant in DENSE_DECODERS else sae.W_dec_value  # atoms are linear in it
    decoder.div_(sae.get_W_dec_norm().reshape(-1, *[1] * (decoder.dim() - 1)))
    sae.fold_W_dec_norm()  # unit-norm atoms (as trained): nothing to fold
    scale = 2.5
    decoder.mul_(scale)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    states = torch.randn(40, D_K, D_V)
    codes, recon = sae.encode(states), sae.decode(sae.encode(states))
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.get_W_dec_norm(), torch.ones(D_SAE))
    folded_codes = sae.encode(states)
    assert torch.equal(folded_codes != 0, codes != 0)
    torch.testing.assert_close(folded_codes, codes * scale)
    torch.testing.assert_close(sae.decode(folded_codes), recon)
    # Unequal norms would change which atoms TopK keeps: refused, as SAELens' TopK SAEs refuse.
    sae.load_state_dict(before)
    decoder[0].mul_(3.0)
    with pytest.raises(NotImplementedError, match="normalize_decoder"):
        sae.fold_W_dec_norm()


def test_a_tied_encoder_cannot_take_the_norms() -> None:
    sae = make_sae("bilinear_tied")
    sae.fold_W_dec_norm()  # unit norms: nothing to fold
    with torch.no_grad():
        sae.W_dec_key.mul_(2.0)
    with pytest.raises(NotImplementedError, match="tied"):
        sae.fold_W_dec_norm()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_in": 31}, "d_in must equal d_k"),
        ({"variant": "flat", "rank": 2}, "rank does not apply"),
        ({"rank": 7}, "exceeds min"),
        ({"k": 0}, "k must be in"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='none'"),
    ],
)
def test_config_errors_name_the_fix(kwargs: dict, match: str) -> None:
    base = {"d_in": D_K * D_V, "d_sae": D_SAE, "d_k": D_K, "d_v": D_V, "k": 4}
    with pytest.raises((ValueError, NotImplementedError), match=match):
        WriteSAEConfig(**{**base, **kwargs})


def test_bad_input_shape_names_the_layouts() -> None:
    with pytest.raises(ValueError, match=r"expected a state \[\.\.\., 6, 5\]"):
        make_sae().encode(torch.randn(2, 7))


def test_shape_checks_are_active() -> None:
    """The jaxtyping import hook is on for writesae in this test session."""
    assert writesae.factors.bilinear_scores_rank1.__module__ == "writesae.factors"
    f = writesae.factors
    with pytest.raises(jaxtyping.TypeCheckError):
        f.bilinear_scores_rank1(torch.randn(2, D_K), torch.randn(3, D_V), torch.randn(4, 1, D_K), torch.randn(4, 1, D_V))
