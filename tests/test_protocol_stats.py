"""Each statistic against a case worked out by hand."""

import math

import numpy as np
import pytest

from writesae.protocols.stats import (
    cliffs_delta,
    cluster_bootstrap,
    cohens_d_paired,
    fit_gaussian_mixture,
    mann_whitney,
    median_mad,
    paired_t_test,
    paired_wilcoxon,
    partition_atoms,
    sign_flip_test,
    wilson_interval,
)


def test_wilson_interval_by_hand():
    # 8/10 at 95%: z = 1.959964; centre (0.8 + z^2/20) / (1 + z^2/10), half-width z*sqrt(0.016 + z^2/400)/(1 + z^2/10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.016 + z * z / 400) / (1 + z * z / 10)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    # Exactly 0 and 1 at the ends (a rounding error there made a plot's error bar negative).
    for n in (3, 10, 144):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_paired_wilcoxon_exact_small_sample():
    # Differences 1..5, all positive: the statistic's exact null distribution puts 1/32 on W=0, two-sided 2/32.
    assert paired_wilcoxon([2, 4, 6, 8, 10], [1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    # Signs +1 -2 +3 -4 +5: W+ = 9, W- = 6. Subset sums of {1..5} <= 6 number 13 of 32, so p = 2 * 13/32.
    assert paired_wilcoxon([1, -2, 3, -4, 5], [0, 0, 0, 0, 0]) == pytest.approx(26 / 32)


def test_cliffs_delta_and_mann_whitney_by_hand():
    # Pairs of [1,2,3] vs [2,2,4]: 2 where x > y, 5 where x < y, 2 ties.
    assert cliffs_delta([1, 2, 3], [2, 2, 4]) == pytest.approx(-3 / 9)
    assert cliffs_delta([5, 6], [1, 2, 3]) == 1.0
    # Complete separation of 3 vs 3: exact two-sided p = 2 / C(6, 3) = 0.1.
    assert mann_whitney([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_median_mad_by_hand():
    median, err = median_mad([1, 2, 3, 4, 100])
    assert median == 3 and err == pytest.approx(1 / math.sqrt(5))  # |x - 3| = 2,1,0,1,97 -> MAD 1


def test_sign_flip_test_by_hand():
    # 6 of 6 pairs won: exactly 2 of the 64 sign patterns are as extreme (all + or all -): p = 1/32.
    p = sign_flip_test(np.zeros(6), np.ones(6), n_permutations=20_000, seed=1)
    assert p == pytest.approx(1 / 32, abs=0.005)
    # The same wins in 2 passages: 4 patterns, 2 as extreme: p = 1/2, however many pairs.
    assert sign_flip_test(np.zeros(6), np.ones(6), clusters=[0, 0, 0, 1, 1, 1], n_permutations=20_000) == pytest.approx(0.5, abs=0.02)
    # Ties carry no sign; balanced wins and losses are not extreme.
    assert sign_flip_test([0, 1, 0, 1], [1, 0, 1, 0], n_permutations=2000) == 1.0


def test_cluster_bootstrap_respects_clusters():
    # Clusters that are each constant: every resample's mean lies between the cluster means.
    values = [0.2] * 10 + [0.8] * 10
    clusters = ["a"] * 10 + ["b"] * 10
    low, high = cluster_bootstrap(values, clusters, n_resamples=2000, seed=1)
    assert 0.2 - 1e-12 <= low < 0.5 < high <= 0.8 + 1e-12
    assert cluster_bootstrap([0.4] * 6, ["a", "b", "c"] * 2) == (pytest.approx(0.4), pytest.approx(0.4))


def test_mixture_bic_prefers_two_classes_only_when_there_are_two():
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.01, 0.005, 200), rng.normal(0.26, 0.05, 100)])
    unimodal = rng.normal(0.1, 0.03, 300)
    two = fit_gaussian_mixture(bimodal, 2)
    assert two.means[0] == pytest.approx(0.01, abs=0.005) and two.means[1] == pytest.approx(0.26, abs=0.02)
    assert two.weights[1] == pytest.approx(1 / 3, abs=0.03)
    split = partition_atoms(dict(enumerate(bimodal)), threshold=None)
    assert split.delta_bic < -100 and len(split.registers) == pytest.approx(100, abs=5)
    assert partition_atoms(dict(enumerate(unimodal))).delta_bic > -10  # no real evidence for two classes
    by_threshold = partition_atoms({0: 0.01, 1: 0.3, 2: 0.06, 3: -0.02}, threshold=0.05)
    assert by_threshold.registers == [1, 2] and by_threshold.bundles == [0, 3]


def test_paired_t_test_and_cohens_d_by_hand():
    # differences 1, 2, 2, 3: mean 2, sd sqrt(2/3); t = 2 / (sd / 2), d = 2 / sd; p from t with 3 dof
    t, p = paired_t_test([1, 2, 3, 4], [2, 4, 5, 7])
    sd = math.sqrt(2 / 3)
    assert t == pytest.approx(2 / (sd / 2)) and cohens_d_paired([1, 2, 3, 4], [2, 4, 5, 7]) == pytest.approx(2 / sd)
    assert p == pytest.approx(0.016276603459428555)  # 2 * (1 - F_t3(4.899)), tables: between 0.01 and 0.02
    assert paired_t_test([1, 2], [1, 2]) == (0.0, 1.0) and cohens_d_paired([1, 2], [1, 2]) == 0.0
    assert math.isnan(paired_t_test([1], [2])[1])
