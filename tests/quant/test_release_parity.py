"""Shift-and-Sum and BRECQ defaults that reproduce the released code (docs/fidelity.md), each against a hand value."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from varq.calib.resample import draw_distinct_labels
from varq.compose import compose_run_config
from varq.config import BitsConfig
from varq.models.adapter import LinearSite
from varq.quant.bitops import choose_theta, extra_cost, model_bitops
from varq.quant.methods.brecq import BrecqConfig, framework_policy
from varq.quant.methods.ours import OursConfig, OursLiteVARConfig, ShiftAndSum, ShiftAndSumLiteVAR
from varq.quant.qmodules import QuantLinear
from varq.quant.recon import ReconConfig
from varq.quant.recon.adaround import Unit, fit_unit
from varq.quant.replay import forward_kv_cached
from varq.quant.rounding import AdaRoundRounding
from varq.quant.shift_sum import record_importance
from varq.sample.sampler import generate

W4A4 = BitsConfig("w4a4", 4, 4)
SAMPLING = SimpleNamespace(cfg=1.5, top_k=8, top_p=0.9)


# ------------------------------------------------------------------------------- weight (Δ, z): clamp and step floor
def _weight_quantizer(policy, fqn: str, weight: torch.Tensor):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    weight_q, _ = policy.linear_quantizers(LinearSite(fqn, "qkv"), linear, W4A4)
    return weight_q


@pytest.mark.parametrize("policy", [framework_policy(OursConfig()), framework_policy(BrecqConfig())], ids=["ours", "brecq"])
def test_weight_zero_point_is_clamped_and_the_step_floored_as_released(policy):
    # Row 0 excludes 0: Δ = 3/15 = 0.2 and z = round(-1/0.2) = -5, clamped to 0, so the grid is {0, 0.2, …, 3.0} and
    # 4.0 clips to 3.0. Row 1 is constant 3e-6: Δ is floored to 1e-6, z = -3 → 0, code 3 → 3e-6 (with a 1e-8 floor
    # the code would be 300, clamped to 15: 1.5e-7).
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3e-6, 3e-6, 3e-6, 3e-6]])
    w_hat = _weight_quantizer(policy, "blocks.0.attn.proj", weight)(weight)
    torch.testing.assert_close(w_hat[0], torch.tensor([1.0, 2.0, 3.0, 3.0]))
    torch.testing.assert_close(w_hat[1], torch.full((4,), 3e-6), atol=1e-12, rtol=1e-5)


def test_unclamped_weight_zero_point_is_an_option():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    config = OursConfig(weight_zero_point_clamp=False, weight_min_step=1e-8)
    w_hat = _weight_quantizer(framework_policy(config), "blocks.0.attn.proj", weight)(weight)
    torch.testing.assert_close(w_hat[0], weight[0])  # z = -5 shifts the grid onto [1, 4]
    with pytest.raises(ValueError, match="weight_min_step"):
        OursConfig(weight_min_step=0.0)


# ------------------------------------------------------------------------------------------------------ θ source
def _theta_from(records, qvar, config, rows=1):
    cost = extra_cost(records, qvar.blocks[0].attn.head_dim, num_pairs=rows, max_order=config.max_order)
    return choose_theta(cost, model_bitops(qvar, (4, 4)).total, config.alpha, config.theta_grid).theta


def test_theta_is_searched_on_a_free_running_generation_of_the_first_class(models, calib_set):
    var, vqvae = models
    config = OursConfig(iters=0, alpha=0.02, reestimate_theta=False)
    assert config.theta_source == "free_run"
    method = ShiftAndSum(config)
    method.attach_sampler(vqvae, SAMPLING)
    method.calibrate(copy.deepcopy(var), calib_set, W4A4)
    got = method.report()["theta_init"]

    # the release: the quantized model (θ off) samples label #0 with CFG from a generator seeded 2025
    qvar = ShiftAndSum(config).quantize(copy.deepcopy(var), W4A4)
    with record_importance(qvar) as free_records, torch.no_grad():
        generate(qvar, vqvae, calib_set.labels_N[:1], cfg=1.5, top_k=8, top_p=0.9,
                 rng=torch.Generator().manual_seed(2025))
    label_2B, x_2BLC = calib_set.teacher_batch([0], with_uncond=True)
    with record_importance(qvar) as replay_records, torch.no_grad():
        forward_kv_cached(qvar, label_2B, x_2BLC, num_cond=1)
    free_theta, replay_theta = _theta_from(free_records, qvar, config), _theta_from(replay_records, qvar, config)
    assert free_theta != replay_theta  # the two sources are distinguishable on this model
    assert got == free_theta

    replay = ShiftAndSum(OursConfig(iters=0, alpha=0.02, reestimate_theta=False, theta_source="replay"))
    replay.calibrate(copy.deepcopy(var), calib_set, W4A4)
    assert replay.report()["theta_init"] == replay_theta


def test_free_run_without_a_sampler_fails_before_quantizing(models, calib_set):
    var = copy.deepcopy(models[0])
    with pytest.raises(ValueError, match="theta_source=replay"):
        ShiftAndSum(OursConfig(iters=0)).calibrate(var, calib_set, W4A4)
    assert not any(isinstance(m, QuantLinear) for m in var.modules())
    with pytest.raises(ValueError, match="theta_source"):
        OursConfig(theta_source="teacher")


# ------------------------------------------------------------------------------------------------------ class draw
def test_distinct_classes_are_drawn_with_numpys_choice_as_released():
    state = np.random.get_state()
    try:
        np.random.seed(2025)
        released = np.random.choice(1000, 256, replace=False)
    finally:
        np.random.set_state(state)
    assert draw_distinct_labels(256, 1000, 2025).tolist() == released.tolist()
    assert compose_run_config(["quant=ours"]).calib.class_draw == "numpy"
    torch_draw = torch.randperm(1000, generator=torch.Generator().manual_seed(2025))[:256]
    assert draw_distinct_labels(256, 1000, 2025, "torch").tolist() == torch_draw.tolist()
    assert sorted(draw_distinct_labels(50, 10, 1).tolist()) == list(range(10))  # capped at the class count
    with pytest.raises(ValueError, match="calib.class_draw"):
        draw_distinct_labels(4, 10, 0, "python")


# ------------------------------------------------------------------------------------ ours_litevar BitOPs accounting
def test_ours_litevar_counts_its_fp_fc2_at_the_run_bits_by_default(models, calib_set):
    # Hand count of the tiny VAR (tests/quant/test_bitops.py): 76,029,952 BitOPs per CFG pair at W4A4; fc2 has
    # 2·21 rows × 256 × 64 MACs per pair in each of the 2 blocks.
    fc2_macs = 42 * 256 * 64
    expected = {"as_quantized": 76_029_952, "fp16": 76_029_952 + 2 * fc2_macs * (16 * 16 - 4 * 4)}
    for accounting in (None, "fp16"):
        extra = {} if accounting is None else {"bitops_fp_layers": accounting}
        method = ShiftAndSumLiteVAR(OursLiteVARConfig(iters=0, alpha=0.02, theta_source="replay", **extra))
        qvar = method.calibrate(copy.deepcopy(models[0]), calib_set, W4A4)
        assert method.report(qvar)["bitops_per_pair"] == expected[accounting or "as_quantized"]
    with pytest.raises(ValueError, match="bitops_fp_layers"):
        OursConfig(bitops_fp_layers="ignore")


# --------------------------------------------------------------------------------------- reconstruction budget
@pytest.mark.parametrize("quant", ["ours", "brecq"])
def test_an_explicit_budget_wins_even_when_it_equals_the_method_default(quant):
    digits = compose_run_config([f"quant={quant}", "model=var_digits"]).quant
    assert (digits.iters, digits.lr) == (300, 1.5e-3)  # the model's budget when nothing is set
    explicit = compose_run_config([f"quant={quant}", "model=var_digits", "quant.iters=5000", "quant.lr=1e-4"]).quant
    assert (explicit.iters, explicit.lr) == (5000, 1e-4)
    d16 = compose_run_config([f"quant={quant}", "model=var_d16"]).quant
    assert (d16.iters, d16.lr) == (5000, 1e-4)  # no model budget: the paper's values


# ------------------------------------------------------------------------------------------------------ β schedule
def _spy_unit(iters: int, warmup: float, monkeypatch) -> list[float]:
    betas: list[float] = []
    original = AdaRoundRounding.regularizer

    def spy(self, beta):
        betas.append(float(beta))
        return original(self, beta)

    monkeypatch.setattr(AdaRoundRounding, "regularizer", spy)
    from varq.quant.factories import static_weight_quantizer, weight_spec

    linear = nn.Linear(4, 3)
    qlinear = QuantLinear(linear, static_weight_quantizer(linear, weight_spec(4, 4)))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    cfg = ReconConfig(iters=iters, batch_size=2, lr=1e-3, weight_reg=0.1, b_start=20.0, b_end=2.0, warmup=warmup)
    fit_unit(Unit("u", {"u": qlinear}, qlinear, None), x, linear(x).detach(), cfg, torch.Generator().manual_seed(0))
    return betas


def test_beta_counts_iterations_from_one_as_released(monkeypatch):
    # β(count) = 2 + 18·max(0, 1 − count/4) for count = 1..4, then fit_unit scores the regulariser at b_end
    assert _spy_unit(4, 0.0, monkeypatch) == [15.5, 11.0, 6.5, 2.0, 2.0]


def test_warmup_switches_the_regulariser_off_for_the_first_iterations(monkeypatch):
    # warm-up 0.5 of 4: counts 1 (< 2) has no regulariser; counts 2, 3, 4 give β = 20, 11, 2
    assert _spy_unit(4, 0.5, monkeypatch) == [20.0, 11.0, 2.0, 2.0]
    assert ReconConfig(iters=10, warmup=0.3).beta(2) is None and ReconConfig(iters=10, warmup=0.3).beta(3) == 20.0


def test_brecq_calibrates_on_ours_generations_without_resampling():
    brecq, ours = compose_run_config(["quant=brecq"]), compose_run_config(["quant=ours"])
    assert brecq.calib.name == "distinct" and ours.calib.name == "resample"
    same = ("n_images", "seed", "batch_size", "class_draw")
    assert all(getattr(brecq.calib, k) == getattr(ours.calib, k) for k in same)


@pytest.mark.parametrize("quant", ["ours", "ours_litevar", "brecq"])
def test_the_composed_method_configs_default_to_the_released_behaviour(quant):
    q = compose_run_config([f"quant={quant}"]).quant
    assert (q.weight_zero_point_clamp, q.weight_min_step) == (True, 1e-6)
    if quant != "brecq":
        assert (q.theta_source, q.theta_seed, q.bitops_fp_layers) == ("free_run", 2025, "as_quantized")


def test_distinct_calibration_is_the_resample_set_before_its_redraws(run_config, models):
    # Same classes, batches and seeds: the sequences differ exactly at the slots the resampling redrew (a redrawn
    # slot leaves an over-represented code for a short one, so it always changes).
    from varq.calib import build_calibration_set

    var, vqvae = models
    base = ("model=var_tiny", "eval=smoke", "calib.batch_size=4")
    distinct = build_calibration_set(run_config(*base, "quant=brecq"), var, vqvae, "cpu")
    resampled = build_calibration_set(run_config(*base, "quant=ours"), var, vqvae, "cpu")
    assert distinct.meta["builder"] == "distinct" and distinct.labels_N.tolist() == resampled.labels_N.tolist()
    changed = [int((a != b).sum()) for a, b in zip(distinct.idx_per_scale, resampled.idx_per_scale)]
    assert changed == resampled.meta["redrawn_per_scale"] and sum(changed) > 0
