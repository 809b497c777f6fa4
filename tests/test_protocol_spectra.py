"""The spectral audit on constructed spectra, against svdvals of cached states, and on a planted rank-1 head."""

import math

import pytest
import torch
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair

from writesae.protocols.spectra import (
    PAPER_REFERENCE,
    SpectraConfig,
    covariance_eigenvalues,
    effective_rank,
    run_spectra,
    stable_rank,
    state_spectrum_stats,
    write_reuse,
)


def matrix_with_spectrum(sigma, d_k, d_v, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_v, d_v, generator=g, dtype=torch.float64))
    s = torch.zeros(d_k, d_v, dtype=torch.float64)
    s[range(len(sigma)), range(len(sigma))] = torch.tensor(sigma, dtype=torch.float64)
    return u @ s @ v.T


def test_measures_of_a_known_spectrum():
    sigma = [6.0, 2.0, 1.0, 1.0]
    stats = state_spectrum_stats(matrix_with_spectrum(sigma, 6, 5)[None])
    p = torch.tensor(sigma) / sum(sigma)
    assert float(stats["sigma1_over_sigma2"][0]) == pytest.approx(3.0)
    assert float(stats["effective_rank"][0]) == pytest.approx(math.exp(-(p * p.log()).sum()))
    assert float(stats["stable_rank"][0]) == pytest.approx((36 + 4 + 1 + 1) / 36)
    assert float(stats["top1_variance"][0]) == pytest.approx(36 / 42)
    assert float(effective_rank(torch.ones(7))) == pytest.approx(7.0)  # a flat spectrum: full rank
    assert float(stable_rank(torch.tensor([2.0, 0.0, 0.0]))) == 1.0
    rank1 = state_spectrum_stats(matrix_with_spectrum([5.0], 4, 4)[None])
    for n, d in ((9, 4), (4, 9)):  # both sides of the Gram matrix
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        expected = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)[: min(n, d)]
        assert torch.allclose(covariance_eigenvalues(x)[: min(n, d)], expected, atol=1e-10)
    assert float(rank1["effective_rank"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(rank1["sigma1_over_sigma2"][0]) > 1e12


def test_write_reuse_is_one_for_one_direction_and_minimal_for_an_even_spread():
    g = torch.Generator().manual_seed(1)
    key, value = torch.randn(8, generator=g), torch.randn(6, generator=g)
    scales = torch.rand(50, 1, generator=g) + 0.5
    for moment in ("second_moment", "covariance"):
        assert write_reuse(scales * key, scales * value, moment)[0] == pytest.approx(1.0, abs=1e-6)
    # Factors cycling through orthonormal bases: every direction equally often.
    keys, values = torch.eye(8).repeat(6, 1), torch.eye(6).repeat_interleave(8, 0)
    score, key_rank, value_rank = write_reuse(keys, values)
    assert (key_rank, value_rank) == (pytest.approx(8.0), pytest.approx(6.0))
    assert score == pytest.approx(1 / math.sqrt(48))


def plant_rank1(model, layer, head, seed=0):
    """Hooks giving one head the same unit key and value at every position: its states are rank 1."""
    g = torch.Generator().manual_seed(seed)
    key = torch.nn.functional.normalize(torch.randn(model.cfg.d_k, generator=g), dim=0)
    value = torch.randn(model.cfg.d_v, generator=g)

    def fix(vector):
        def hook(x, hook):
            x[:, :, head] = vector.to(x)
            return x
        return hook

    name = model.cfg.hook_name
    return [(name(layer, "hook_write_key"), fix(key)), (name(layer, "hook_write_value"), fix(value))]


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_records_match_svdvals_of_cached_states_and_a_planted_head_is_rank_one(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer, planted = model.cfg.recurrent_layers[-1], 1
    tokens = random_tokens(3, 24, seed=2)
    config = SpectraConfig(batch_size=2, covariance_samples=40)
    with model.hooks(fwd_hooks=plant_rank1(model, layer, planted)):
        result = run_spectra(model, tokens, config=config, out_dir=tmp_path, verbose=False)
        _, cache = model.run_with_cache(tokens, names_filter=[model.cfg.hook_name(layer, "hook_state")])
    states = cache[model.cfg.hook_name(layer, "hook_state")][:, config.skip_first :].double()
    assert len(result.records) == len(model.cfg.recurrent_layers) * model.cfg.n_heads
    for r in (r for r in result.records if r.layer == layer):
        sigma = torch.linalg.svdvals(states[:, :, r.head].flatten(0, 1))  # independent of the protocol's code
        assert r.n_states == 3 * (24 - config.skip_first)
        assert r.sigma1 == pytest.approx(float(sigma[:, 0].median()), rel=1e-4)
        if r.head != planted:
            assert r.sigma1_over_sigma2 == pytest.approx(float((sigma[:, 0] / sigma[:, 1]).median()), rel=1e-4)
            assert r.stable_rank == pytest.approx(float(((sigma**2).sum(1) / sigma[:, 0] ** 2).median()), rel=1e-4)
    rows = {(r.layer, r.head): r for r in result.records}
    p = rows[(layer, planted)]
    assert p.stable_rank == pytest.approx(1.0, abs=1e-4) and p.effective_rank < 1.01
    assert p.write_reuse == pytest.approx(1.0)
    others = [r for r in result.records if (r.layer, r.head) != (layer, planted)]
    assert all(r.stable_rank > 1.01 and r.write_reuse < 0.9 for r in others)
    assert result.summary["headline"]["most_rank1_cell"] == f"L{layer} H{planted}"
    written = {f.name for f in tmp_path.iterdir()}
    assert {"settings.json", "records.jsonl", "summary.json", "report.md", "spectra.png"} <= written
    assert result.summary["paper_reference"] == PAPER_REFERENCE


def test_bad_settings_are_refused_with_the_fix():
    model, _ = tiny_pair("tiny-random:mamba2")
    with pytest.raises(ValueError, match="covariance_samples"):
        SpectraConfig(covariance_samples=-1)
    with pytest.raises(ValueError, match="not matrix-recurrent"):
        run_spectra(model, random_tokens(1, 8), config=SpectraConfig(layers=(7,)), verbose=False)
    with pytest.raises(ValueError, match="skip_first"):
        run_spectra(model, random_tokens(1, 1), verbose=False)
