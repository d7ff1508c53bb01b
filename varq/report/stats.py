"""Seed statistics of the tables: mean ± std, a percentile-bootstrap 95 % CI, and a paired comparison.

Pure numpy functions of 1-D samples, no pandas and no I/O, so they can be checked against closed forms.
Every resampling uses a fixed seed: the same rows always render the same intervals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05
# Up to this many pairs every sign pattern is enumerated (2^16 = 65,536); above it a seeded Monte Carlo.
EXACT_SIGN_FLIP_MAX = 16
SIGN_FLIP_DRAWS = 100_000


@dataclass(frozen=True)
class Summary:
    """One cell's repeats: n runs, their mean, sample std (ddof=1; NaN for one run) and bootstrap CI of the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean; (NaN, NaN) below two values (one run has no spread to resample)."""
    x = _clean(values)
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    # "lower"/"higher" keep the ends on values a resampled mean can actually take (no interpolation between them).
    low = float(np.quantile(means, tail, method="lower"))
    high = float(np.quantile(means, 1.0 - tail, method="higher"))
    return low, high


def summarize(values: Sequence[float] | np.ndarray, **bootstrap: int | float) -> Summary:
    """Mean, std and CI over the finite values (NaN metrics of failed runs do not count as runs)."""
    x = _clean(values)
    if x.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    low, high = bootstrap_ci(x, **bootstrap)
    return Summary(int(x.size), float(x.mean()), std, low, high)


def sign_flip_pvalue(differences: Sequence[float] | np.ndarray, *, seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided paired permutation test: under H0 each difference's sign is a coin flip.

    p = share of sign patterns whose |mean| reaches the observed |mean| (exact up to EXACT_SIGN_FLIP_MAX pairs).
    With n pairs the smallest attainable p is 2 / 2^n, so 5 pairs can never reach 0.05.
    """
    d = _clean(differences)
    if d.size == 0:
        return math.nan
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= EXACT_SIGN_FLIP_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) / d.size >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(SIGN_FLIP_DRAWS, d.size))
    hits = np.sum(np.abs(signs @ d) / d.size >= observed - tolerance)
    return float((hits + 1) / (SIGN_FLIP_DRAWS + 1))  # the observed pattern counts once (valid Monte Carlo p)


@dataclass(frozen=True)
class PairedResult:
    """A − B over paired runs. ``verdict``: "A" or "B" (significantly better), or "tie" (not significant)."""

    n_pairs: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str


def paired_comparison(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, higher_is_better: bool, alpha: float = ALPHA,
) -> PairedResult:
    """Does A beat B on matched runs (same calibration and eval seeds)? a[i] and b[i] must be one pair.

    Significant = the bootstrap CI of the mean difference excludes 0 AND the sign-flip p-value is below alpha;
    the two agree almost always, and requiring both keeps a lucky resample from declaring a winner.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.shape} vs {b_arr.shape}")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    d = a_arr[keep] - b_arr[keep]
    if d.size == 0:
        return PairedResult(0, math.nan, math.nan, math.nan, math.nan, "tie")
    low, high = bootstrap_ci(d)
    p = sign_flip_pvalue(d)
    mean = float(d.mean())
    verdict = "tie"
    if p < alpha and not (low <= 0.0 <= high):
        a_better = mean > 0 if higher_is_better else mean < 0
        verdict = "A" if a_better else "B"
    return PairedResult(int(d.size), mean, low, high, p, verdict)


def format_mean(summary: Summary, digits: int) -> str:
    """``12.34`` for one run, ``12.34 ± 0.56`` when runs repeat (the std, not the standard error)."""
    if summary.n > 1 and math.isfinite(summary.std):
        return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"
    return f"{summary.mean:.{digits}f}"
