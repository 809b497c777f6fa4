"""Flat+SVD substitution (Table 6): a flat atom that is exactly rank-1 is substituted as the WriteSAE atom it equals;
so is a bilinear_flat atom (matched-filter encoder, dense decoder), against the bilinear WriteSAE with its filters."""

import pytest
import torch

import writesae  # noqa: F401
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.flat_svd import FlatSVDConfig, rank1_projection, run_flat_svd
from writesae.protocols.substitution import VARIANTS, SubstitutionConfig, run_substitution
from writesae.protocols.substitution_set import untag


def sae(model, layer, head, variant, d_sae, k, rank=1):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=k, variant=variant, rank=rank)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=0)


# A dense-decoder family and the factor-decoder family with the same encoder.
PAIRS = {"flat": "matrix", "bilinear_flat": "bilinear"}


def rank1_pair(model, layer, head, d_sae=6, k=1, dense="flat", rank=1):
    """A dense-decoder SAE (``dense``) whose atoms are exactly rank-1 (norms 0.5..2), and the WriteSAE with the
    same encoder and those atoms as factors (flat -> matrix, bilinear_flat -> bilinear)."""
    g = torch.Generator().manual_seed(1)
    unit = torch.nn.functional.normalize
    keys = unit(torch.randn(d_sae, model.cfg.d_k, generator=g), dim=-1)
    values = unit(torch.randn(d_sae, model.cfg.d_v, generator=g), dim=-1)
    norms = torch.linspace(0.5, 2.0, d_sae)
    flat = sae(model, layer, head, dense, d_sae, k, rank)
    factored = sae(model, layer, head, PAIRS[dense], d_sae, k, rank)
    with torch.no_grad():
        flat.W_dec.copy_((norms[:, None, None] * keys[:, :, None] * values[:, None, :]).reshape(d_sae, -1))
        for name in ("W_enc", "W_enc_key", "W_enc_value", "b_enc"):
            if name in dict(flat.named_parameters()):
                getattr(factored, name).copy_(getattr(flat, name))
        factored.b_dec.zero_()
        flat.b_dec.zero_()
        factored.W_dec_key.zero_()
        factored.W_dec_value.zero_()
        factored.W_dec_key[:, 0].copy_(norms[:, None] * keys)
        factored.W_dec_value[:, 0].copy_(values)
    return flat, factored


def assert_same(a, b, variants):
    assert (a.sequence, a.position, a.atom, a.activation, a.dominant_atom, a.random_atom) == (
        b.sequence, b.position, b.atom, b.activation, b.dominant_atom, b.random_atom)
    assert a.kl_delete == b.kl_delete
    for v in variants:
        assert a.kl_atom[v] == pytest.approx(b.kl_atom[v], rel=1e-4, abs=1e-9)
        assert a.kl_random[v] == pytest.approx(b.kl_random[v], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("dense", ["flat", "bilinear_flat"])
def test_an_exactly_rank1_flat_atom_substitutes_as_the_equal_writesae_atom(tmp_path, dense):
    model, _ = tiny_pair("tiny-random:qwen3.5")
    layer, head = model.cfg.recurrent_layers[0], 1
    flat, factored = rank1_pair(model, layer, head, dense=dense)
    assert torch.allclose(rank1_projection(flat).atom_matrices(), factored.atom_matrices(), atol=1e-6)
    tokens = random_tokens(2, 10, seed=4)
    substitution = SubstitutionConfig(max_firings_per_atom=1, n_bootstrap=20, n_permutations=20)
    alone = run_substitution(model, factored, tokens, config=substitution, verbose=False).records
    assert len(alone) >= 4
    for svd_of, variants in (("atom", VARIANTS), ("reconstruction", ("firing/matched_norm", "dominant/matched_norm"))):
        config = FlatSVDConfig(substitution=substitution, svd_of=svd_of)
        out_dir = tmp_path if svd_of == "atom" else None  # one run writes its folder (plots are slow to import)
        result = run_flat_svd(model, factored, tokens, flat_sae=flat, config=config, verbose=False, out_dir=out_dir)
        atoms = [untag(r) for r in result.records if r.sae == "writesae"]
        flat_svd = [r for r in result.records if r.sae == "flat_svd"]
        assert atoms == alone  # the set runs each test exactly as alone
        assert len(flat_svd) == len(alone)
        for a, b in zip(flat_svd, alone):
            assert_same(a, b, variants)
        h = result.summary["headline"]
        assert h["flat_svd_win_rate"] == pytest.approx(h["writesae_win_rate"]) and h["delta_pp"] == pytest.approx(0.0)
    assert (tmp_path / "win_rates.png").is_file() and (tmp_path / "atoms_flat_svd.jsonl").is_file()


def test_projecting_a_rank2_bilinear_flat_keeps_its_filters_and_its_rank1_atoms():
    """A rank-2 matched filter over exactly rank-1 dense atoms projects to the rank-2 bilinear WriteSAE with the same
    filters and the same atoms (top pair, then a zero factor row): same codes, same reconstructions."""
    model, _ = tiny_pair("tiny-random:qwen3.5")
    layer, head = model.cfg.recurrent_layers[0], 1
    flat, factored = rank1_pair(model, layer, head, d_sae=8, k=2, dense="bilinear_flat", rank=2)
    projected = rank1_projection(flat)
    assert projected.cfg.variant == "bilinear" and projected.cfg.rank == 2
    torch.testing.assert_close(projected.atom_matrices(), flat.atom_matrices(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(projected.atom_matrices(), factored.atom_matrices(), atol=1e-6, rtol=1e-5)
    assert (projected.W_dec_key[:, 1] == 0).all() and (projected.W_dec_value[:, 1] == 0).all()
    states = torch.randn(5, model.cfg.d_k, model.cfg.d_v)
    with torch.no_grad():
        assert torch.equal(projected.encode(states), flat.encode(states))
        torch.testing.assert_close(projected(states), flat(states), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dense-decoder SAE"):
        rank1_projection(factored)


def test_reconstruction_svd_of_a_rank2_reconstruction_is_its_top_pair():
    """With two atoms at a position, the substitute is the top singular pair of their sum, not either atom."""
    model, _ = tiny_pair("tiny-random:qwen3.5")
    layer, head = model.cfg.recurrent_layers[0], 1
    flat, _ = rank1_pair(model, layer, head, k=2)
    tokens = random_tokens(1, 8, seed=4)
    config = FlatSVDConfig(substitution=SubstitutionConfig(scale="matched_norm", n_bootstrap=20, n_permutations=20))
    from writesae.protocols.flat_svd import FlatSVDTest

    test = FlatSVDTest(model, rank1_projection(flat), tokens, flat_sae=flat, config=config).tests["flat_svd"]
    b, t = int(test.activity.sequence[0]), int(test.activity.position[0])
    active, codes = test.activity.codes_at(b, t)
    assert len(active) == 2
    recon = sum(c * flat.atom_matrices()[a] for a, c in zip(active.tolist(), codes.tolist())).detach().double()
    matrix, norm = test._substitute(test.firings[0].__class__(b, t, int(active[0]), float(codes[0])), int(active[0]))
    u, s, vh = torch.linalg.svd(recon)
    assert norm == 1.0 and torch.allclose(matrix.double(), torch.outer(u[:, 0], vh[0]), atol=1e-5)
    assert float((recon * matrix.double()).sum()) == pytest.approx(float(s[0]), rel=1e-4)  # aligned, not flipped
