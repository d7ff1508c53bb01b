"""calib=resample (methods.md §3.5): distinct classes, largest-remainder targets, exact per-scale histograms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import PATCH_NUMS, tiny_var, tiny_vqvae
from varq.calib import build_calibration_set
from varq.calib.random import fp_generations
from varq.calib.resample import (
    FilteredProbsRecorder,
    SparseProbs,
    draw_distinct_labels,
    resample_scale,
    resample_tokens,
    target_histogram,
)

OVERRIDES = ("model=var_tiny", "eval=smoke", "quant=ours", "calib.batch_size=4")


def test_largest_remainder_target_sums_to_the_slot_count():
    p = np.random.default_rng(0).dirichlet(np.ones(50) * 0.3)
    target = target_histogram(p, 997)
    assert target.sum() == 997 and np.all(np.abs(target - 997 * p) < 1)
    assert target_histogram(np.array([0.5, 0.25, 0.25]), 6).tolist() == [3, 2, 1]  # tie → lower code


def _synthetic(seed: int, N=400, V=12):
    rng = np.random.default_rng(seed)
    p_NV = rng.dirichlet(np.ones(V) * 0.5, size=N)
    p_NV[p_NV < 0.03] = 0  # sparse supports, like top-k/top-p
    p_NV /= p_NV.sum(1, keepdims=True)
    skew_NV = p_NV ** 3 / (p_NV ** 3).sum(1, keepdims=True)  # over-represent the likely codes
    idx_N = np.array([rng.choice(V, p=row) for row in skew_NV])
    return idx_N, SparseProbs.from_dense(torch.from_numpy(p_NV)), p_NV


def test_resampled_histogram_equals_its_target_exactly_and_redraws_stay_in_support():
    idx_N, probs, p_NV = _synthetic(0)
    rows = np.arange(len(idx_N)) // 10
    new, target, redrawn = resample_scale(idx_N, probs, rows, [np.random.default_rng(i) for i in range(40)])
    assert np.array_equal(np.bincount(new, minlength=12), target) and redrawn > 0
    assert redrawn == np.maximum(np.bincount(idx_N, minlength=12) - target, 0).sum()
    changed = new != idx_N
    # slots are picked by their mass on the short codes, so redraws land in the slot's own support (uniform only
    # when that mass is 0)
    assert np.mean(p_NV[changed, new[changed]] > 0) > 0.9
    again, _, _ = resample_scale(idx_N, probs, rows, [np.random.default_rng(i) for i in range(40)])
    assert np.array_equal(new, again)


def test_distinct_labels_are_capped_at_the_class_count():
    labels = draw_distinct_labels(256, 10, seed=2025)
    assert sorted(labels.tolist()) == list(range(10))
    assert len(set(draw_distinct_labels(5, 1000, seed=1).tolist())) == 5


@pytest.fixture(scope="module")
def models():
    return tiny_var(), tiny_vqvae()


def test_tiny_model_every_scale_matches_its_target_and_the_builder_is_deterministic(run_config, models, tmp_path):
    var, vqvae = models
    cfg = run_config(*OVERRIDES)
    assert cfg.calib.name == "resample"  # quant=ours selects it
    labels = draw_distinct_labels(cfg.calib.n_images, var.num_classes, cfg.calib.seed)
    recorder = FilteredProbsRecorder(cfg.eval.cfg, cfg.eval.top_k, cfg.eval.top_p, len(PATCH_NUMS))
    sampled = fp_generations(cfg, var, vqvae, "cpu", labels, on_logits=recorder)
    idx, targets, stats = resample_tokens(sampled.idx_per_scale, recorder, sampled.labels_N, cfg.calib.seed)
    for si, (idx_Nl, target) in enumerate(zip(idx, targets)):
        assert idx_Nl.shape == (10, PATCH_NUMS[si] ** 2)
        assert np.array_equal(np.bincount(idx_Nl.flatten().numpy(), minlength=var.V), target)
    assert sum(stats["redrawn_per_scale"]) > 0

    cs = build_calibration_set(cfg, var, vqvae, "cpu")
    assert sorted(cs.labels_N.tolist()) == list(range(10)) and cs.meta["builder"] == "resample"
    assert all(torch.equal(a, b) for a, b in zip(cs.idx_per_scale, idx))  # the same tokens, cached or not
    torch.testing.assert_close(cs.teacher_input_NLC, vqvae.idxBl_to_var_input(idx), atol=0, rtol=0)
    other = run_config(*OVERRIDES, f"paths.cache={tmp_path}/other")
    rebuilt = build_calibration_set(other, var, vqvae, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.idx_per_scale, cs.idx_per_scale))
