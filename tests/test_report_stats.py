"""Seed statistics against closed forms: std, bootstrap CI, sign-flip p-values and the paired verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from varq.report.stats import (
    bootstrap_ci,
    format_mean,
    paired_comparison,
    sign_flip_pvalue,
    summarize,
)


def test_summary_mean_and_sample_std_closed_form() -> None:
    s = summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert s.n == 8 and s.mean == pytest.approx(5.0)
    assert s.std == pytest.approx(math.sqrt(32.0 / 7.0))  # Σ(x−5)² = 32, ddof = 1
    assert s.ci_low < s.mean < s.ci_high


def test_one_run_has_no_spread_and_nan_runs_do_not_count() -> None:
    s = summarize([3.5, float("nan")])
    assert (s.n, s.mean) == (1, 3.5)
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert format_mean(s, 2) == "3.50"
    assert format_mean(summarize([1.0, 3.0]), 1) == "2.0 ± 1.4"
    assert summarize([]).n == 0


def test_bootstrap_of_two_values_spans_them() -> None:
    # Resampled means of {a, b} are a (p=1/4), (a+b)/2 (p=1/2), b (p=1/4): the 2.5 % and 97.5 % points are a and b.
    assert bootstrap_ci([10.0, 14.0]) == (10.0, 14.0)


def test_bootstrap_matches_normal_theory_for_large_n() -> None:
    x = np.random.default_rng(7).normal(3.0, 2.0, size=400)
    low, high = bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.03)
    assert high == pytest.approx(x.mean() + half, abs=0.03)
    assert bootstrap_ci(x) == (low, high)  # fixed seed: the same rows render the same interval


def test_bootstrap_matches_scipy_percentile() -> None:
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(1).exponential(1.0, size=30)
    ref = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=10_000, method="percentile",
                          random_state=np.random.default_rng(5)).confidence_interval
    low, high = bootstrap_ci(x)
    # Both are Monte Carlo (10,000 resamples, different streams): agree to a few % of the interval width (≈ 1.2).
    assert low == pytest.approx(ref.low, abs=0.05) and high == pytest.approx(ref.high, abs=0.05)


def test_sign_flip_exact_closed_forms() -> None:
    # All 5 differences positive: only the all-plus and all-minus patterns reach |mean| → p = 2/32.
    assert sign_flip_pvalue([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    # {1, −1}: every pattern has |mean| ≥ 0 → p = 1.
    assert sign_flip_pvalue([1.0, -1.0]) == pytest.approx(1.0)
    # {3, 1, 1}: |mean| ≥ 5/3 only for (+,+,+) and (−,−,−); (+,+,−) and (+,−,+) give 1 → p = 2/8.
    assert sign_flip_pvalue([3.0, 1.0, 1.0]) == pytest.approx(2 / 8)


def test_sign_flip_matches_scipy_permutation_test() -> None:
    stats = pytest.importorskip("scipy.stats")
    d = np.array([0.8, -0.3, 1.9, 0.4, 1.1, -0.2, 0.9, 0.6])
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided",
                                 n_resamples=math.inf).pvalue
    assert sign_flip_pvalue(d) == pytest.approx(ref)


def test_paired_verdict_on_known_pairs() -> None:
    # FID (lower is better): A is 2.0 below B on each of 8 paired seeds, with a little noise.
    b = np.array([20.0, 18.0, 25.0, 22.0, 19.0, 21.0, 24.0, 23.0])
    a = b - 2.0 + np.array([0.1, -0.1, 0.2, 0.0, -0.2, 0.1, 0.0, -0.1])
    result = paired_comparison(a, b, higher_is_better=False)
    assert result.n_pairs == 8 and result.mean_diff == pytest.approx(-2.0)
    assert result.p_value == pytest.approx(2 / 256) and result.verdict == "A"
    assert result.ci_high < 0
    # Same numbers, but IS (higher is better): B wins.
    assert paired_comparison(a, b, higher_is_better=True).verdict == "B"
    # Unpaired spread does not matter: B's seed-to-seed spread (18..25) is larger than the gap, yet pairing shows it.
    assert b.std() > 2.0


def test_paired_five_seeds_can_never_be_significant_and_noise_ties() -> None:
    result = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0], higher_is_better=True)
    assert result.p_value == pytest.approx(0.0625) and result.verdict == "tie"
    noise = paired_comparison([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], [0.0] * 6, higher_is_better=True)
    assert noise.mean_diff == pytest.approx(0.0) and noise.verdict == "tie"


def test_paired_refuses_unmatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_comparison([1.0, 2.0], [1.0], higher_is_better=True)
