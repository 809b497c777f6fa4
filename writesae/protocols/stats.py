"""The statistics the paper reports, written out so each can be checked on a hand-computed case.

Win rates with Wilson intervals, the paired Wilcoxon signed-rank test, Cliff's delta, medians with
MAD/sqrt(n), bootstrap intervals clustered by atom (or passage), Mann-Whitney, and a 1-D Gaussian
mixture with BIC for the register/bundle partition of atoms by their median cosine to the write.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

__all__ = [
    "wilson_interval",
    "paired_wilcoxon",
    "paired_t_test",
    "cohens_d_paired",
    "mann_whitney",
    "cliffs_delta",
    "median_mad",
    "cluster_bootstrap",
    "sign_flip_test",
    "GaussianMixture1D",
    "fit_gaussian_mixture",
    "partition_atoms",
    "AtomPartition",
]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    >>> [round(float(x), 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    >>> wilson_interval(0, 10)[0], wilson_interval(10, 10)[1]
    (0.0, 1.0)
    """
    if n == 0:
        return (0.0, 1.0)
    z = sps.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; the formula leaves a rounding error there
    # (2.8e-17 above 0), which turns a plot's error bar negative.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return (float(low), float(high))


def paired_wilcoxon(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test on the pairs ``(a_i, b_i)``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != len(b):
        raise ValueError("paired_wilcoxon needs two samples of the same length")
    if np.all(a == b):
        return 1.0
    return float(sps.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_t_test(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[float, float]:
    """``(t, two-sided p)`` of the paired t-test of ``mean(b - a) = 0``.

    >>> [round(x, 4) for x in paired_t_test([1, 2, 3, 4], [2, 4, 5, 7])]
    [4.899, 0.0163]
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != len(b):
        raise ValueError("paired_t_test needs two samples of the same length")
    diff = b - a
    if diff.size < 2:
        return (float("nan"), float("nan"))
    sd = float(diff.std(ddof=1))
    if sd == 0:
        return (0.0, 1.0) if diff.mean() == 0 else (math.copysign(math.inf, diff.mean()), 0.0)
    t = float(diff.mean() / (sd / math.sqrt(diff.size)))
    return t, float(2 * sps.t.sf(abs(t), diff.size - 1))


def cohens_d_paired(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Cohen's d of paired samples (d_z): ``mean(b - a) / sd(b - a)``, the paper's "Cohen's d (paired)".

    >>> round(cohens_d_paired([1, 2, 3, 4], [2, 4, 5, 7]), 4)
    2.4495
    """
    diff = np.asarray(b, float) - np.asarray(a, float)
    if diff.size < 2:
        return float("nan")
    sd = float(diff.std(ddof=1))
    return float(diff.mean() / sd) if sd > 0 else (0.0 if diff.mean() == 0 else math.copysign(math.inf, diff.mean()))


def mann_whitney(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Two-sided p-value of the Mann-Whitney U test (independent samples)."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(sps.mannwhitneyu(np.asarray(a, float), np.asarray(b, float), alternative="two-sided").pvalue)


def cliffs_delta(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """P(X > Y) - P(X < Y) over all pairs: +1 when every x exceeds every y.

    >>> round(cliffs_delta([1, 2, 3], [2, 2, 4]), 4)
    -0.3333
    """
    x, y = np.asarray(x, float)[:, None], np.asarray(y, float)[None, :]
    if x.size == 0 or y.size == 0:
        return float("nan")
    return float(((x > y).sum() - (x < y).sum()) / (x.size * y.size))


def median_mad(x: npt.ArrayLike) -> tuple[float, float]:
    """Median and MAD/sqrt(n) (the paper's "median ± MAD/√n")."""
    x = np.asarray(x, float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    median = float(np.median(x))
    return median, float(np.median(np.abs(x - median)) / math.sqrt(x.size))


def cluster_bootstrap(
    values: npt.ArrayLike,
    clusters: npt.ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 5000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval resampling whole clusters (e.g. atoms) with replacement."""
    values = np.asarray(values, float)
    labels = np.asarray([str(c) for c in clusters])
    groups = [values[labels == c] for c in np.unique(labels)]
    if not groups:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_resamples)
    for i in range(n_resamples):
        picked = rng.integers(0, len(groups), len(groups))
        estimates[i] = statistic(np.concatenate([groups[j] for j in picked]))
    tail = (1 - confidence) / 2
    return float(np.quantile(estimates, tail)), float(np.quantile(estimates, 1 - tail))


def sign_flip_test(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    clusters: npt.ArrayLike | None = None,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> float:
    """Two-sided permutation p-value that ``a_i < b_i`` as often as ``a_i > b_i`` (paired samples).

    The statistic is the mean of ``sign(b_i - a_i)`` (e.g. the atom's win rate over deletion minus
    its loss rate). Under the null the two members of a pair are exchangeable, so each pair's sign
    may flip; with ``clusters`` (e.g. the passage of each firing) all pairs of a cluster flip
    together, which keeps the test honest when pairs of one passage are not independent.
    ``p = (1 + #{|permuted| >= |observed|}) / (1 + n_permutations)``.

    >>> sign_flip_test([0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], n_permutations=2000) < 0.01
    True
    """
    signs = np.sign(np.asarray(b, float) - np.asarray(a, float))
    if signs.size == 0:
        return float("nan")
    labels = np.arange(signs.size) if clusters is None else np.unique([str(c) for c in clusters], return_inverse=True)[1]
    totals = np.bincount(labels, weights=signs)
    observed = abs(totals.sum())
    flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_permutations, totals.size))
    extreme = int((np.abs(flips @ totals) >= observed - 1e-9).sum())
    return (1 + extreme) / (1 + n_permutations)


@dataclass
class GaussianMixture1D:
    """A fitted 1-D Gaussian mixture (components sorted by mean)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    log_likelihood: float
    n: int

    @property
    def bic(self) -> float:
        k = len(self.means)
        return (3 * k - 1) * math.log(self.n) - 2 * self.log_likelihood

    def responsibilities(self, x: npt.ArrayLike) -> np.ndarray:
        x = np.asarray(x, float)[:, None]
        log_p = np.log(self.weights) - 0.5 * (np.log(2 * np.pi * self.variances) + (x - self.means) ** 2 / self.variances)
        log_p -= log_p.max(1, keepdims=True)
        p = np.exp(log_p)
        return p / p.sum(1, keepdims=True)


def fit_gaussian_mixture(x: npt.ArrayLike, k: int, seed: int = 0, iterations: int = 500) -> GaussianMixture1D:
    """Maximum-likelihood 1-D Gaussian mixture by EM (quantile initialisation).

    Component variances are floored at 1e-3 of the data's variance: narrower components are
    spikes on a handful of points, which would buy likelihood without describing a class.
    """
    x = np.asarray(x, float)
    n = x.size
    if n < k:
        raise ValueError(f"need at least {k} values to fit {k} components, got {n}")
    floor = max(1e-12, 1e-3 * float(np.var(x)))
    means = np.quantile(x, (np.arange(k) + 0.5) / k)
    variances = np.full(k, max(float(np.var(x)) / k, floor))
    weights = np.full(k, 1 / k)
    previous = -np.inf
    for _ in range(iterations):
        log_p = np.log(weights) - 0.5 * (np.log(2 * np.pi * variances) + (x[:, None] - means) ** 2 / variances)
        top = log_p.max(1, keepdims=True)
        log_likelihood = float((top[:, 0] + np.log(np.exp(log_p - top).sum(1))).sum())
        r = np.exp(log_p - top)
        r /= r.sum(1, keepdims=True)
        mass = r.sum(0) + 1e-12
        weights = mass / n
        means = (r * x[:, None]).sum(0) / mass
        variances = np.maximum((r * (x[:, None] - means) ** 2).sum(0) / mass, floor)
        if log_likelihood - previous < 1e-10 * abs(log_likelihood):
            break
        previous = log_likelihood
    order = np.argsort(means)
    return GaussianMixture1D(weights[order], means[order], variances[order], log_likelihood, n)


@dataclass
class AtomPartition:
    """Register / bundle classes of alive atoms (paper §2.8).

    Attributes:
        registers: Atom indices in the high-cosine class.
        bundles: Atom indices in the low-cosine class.
        delta_bic: BIC(2 components) - BIC(1 component); negative favours two classes.
        threshold: The cosine threshold used (None when the mixture assigned the classes).
        mixture: The two-component fit.
    """

    registers: list[int]
    bundles: list[int]
    delta_bic: float
    threshold: float | None
    mixture: GaussianMixture1D | None


def partition_atoms(
    median_cosines: dict[int, float], threshold: float | None = 0.05, seed: int = 0
) -> AtomPartition:
    """Split alive atoms into registers and bundles by their median cosine to the native write.

    Args:
        median_cosines: ``atom -> median Frobenius cosine`` of its decoded direction to the native
            write over its firings.
        threshold: Register iff median cosine >= threshold (the paper's operational tau = 0.05);
            None assigns each atom to the mixture component with the higher responsibility.
        seed: Seed of the mixture fit.
    """
    atoms = sorted(median_cosines)
    values = np.asarray([median_cosines[a] for a in atoms], float)
    if len(values) < 3:
        return AtomPartition([a for a in atoms if threshold is None or median_cosines[a] >= threshold],
                             [a for a in atoms if threshold is not None and median_cosines[a] < threshold],
                             float("nan"), threshold, None)
    one, two = fit_gaussian_mixture(values, 1, seed), fit_gaussian_mixture(values, 2, seed)
    if threshold is None:
        high = two.responsibilities(values)[:, 1] >= 0.5
    else:
        high = values >= threshold
    return AtomPartition(
        registers=[a for a, h in zip(atoms, high) if h],
        bundles=[a for a, h in zip(atoms, high) if not h],
        delta_bic=two.bic - one.bic,
        threshold=threshold,
        mixture=two,
    )
