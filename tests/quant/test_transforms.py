"""Transforms folded into AdaLN: FP outputs unchanged, the consumer's input really transformed, GPS optimal."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
from varq.quant.primitives import fake_quantize_affine, qparams_minmax
from varq.quant.replay import forward_kv_cached
from varq.quant.transforms import (
    GPSStats,
    adaln_sites,
    fold_channel_transform,
    gps_batch_scales,
    gps_objective,
    gps_scales,
    smoothquant_scales,
    symmetric_shift,
)


@pytest.fixture(scope="module")
def models():
    return tiny_var(), tiny_vqvae()


def _batch(models, seed=3):
    label_B, x_BLC, _ = random_teacher_batch(models[1], B=4, seed=seed)
    return label_B, x_BLC


def _random_transform(C, seed, with_shift=True):
    gen = torch.Generator().manual_seed(seed)
    s_C = torch.exp(torch.randn(C, generator=gen))  # scales spanning ~e^±3
    delta_C = torch.randn(C, generator=gen) * 2 if with_shift else None
    return s_C, delta_C


def _capture_input(var, fqn, label_B, x_BLC):
    seen = []
    h = var.get_submodule(fqn).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        var(label_B, x_BLC)
    h.remove()
    return seen[0]


def test_sites_cover_every_adaln_fed_linear(models):
    sites = adaln_sites(models[0])
    blocks = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.mat_qkv", "ffn.fc1")]
    assert list(sites) == [*blocks, "head"]
    assert sites["head"].ada_lin_fqn == "head_nm.ada_lin.1" and not sites["head"].skips_sink


@pytest.mark.parametrize("with_shift", [False, True], ids=["scale", "scale+shift"])
def test_folding_leaves_fp_outputs_unchanged(models, with_shift):
    var = copy.deepcopy(models[0])
    label_B, x_BLC = _batch(models)
    with torch.no_grad():
        ref = var(label_B, x_BLC)
        ref_cached = forward_kv_cached(var, label_B, x_BLC)
    for i, site in enumerate(adaln_sites(var).values()):
        fold_channel_transform(var, site, *_random_transform(var.C, seed=i, with_shift=with_shift))
    with torch.no_grad():
        out, out_cached = var(label_B, x_BLC), forward_kv_cached(var, label_B, x_BLC)
    assert not torch.equal(var.blocks[0].attn.mat_qkv.weight, models[0].blocks[0].attn.mat_qkv.weight)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out_cached, ref_cached, atol=2e-5, rtol=1e-5)


def test_folding_composes_over_stages(models):
    # PTQ4ARVG folds three times (SmoothQuant, shift, GPS) into the same rows
    var = copy.deepcopy(models[0])
    label_B, x_BLC = _batch(models, seed=4)
    with torch.no_grad():
        ref = var(label_B, x_BLC)
    for stage in range(3):
        for i, site in enumerate(adaln_sites(var).values()):
            fold_channel_transform(var, site, *_random_transform(var.C, seed=10 * stage + i, with_shift=stage == 1))
    with torch.no_grad():
        torch.testing.assert_close(var(label_B, x_BLC), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("fqn", ["blocks.1.attn.mat_qkv", "blocks.0.ffn.fc1", "head"])
def test_consumer_input_becomes_x_over_s_minus_delta(models, fqn):
    var = copy.deepcopy(models[0])
    label_B, x_BLC = _batch(models)
    x_before = _capture_input(var, fqn, label_B, x_BLC)
    s_C, delta_C = _random_transform(var.C, seed=7)
    fold_channel_transform(var, adaln_sites(var)[fqn], s_C, delta_C)
    x_after = _capture_input(var, fqn, label_B, x_BLC)
    torch.testing.assert_close(x_after, x_before / s_C - delta_C, atol=1e-4, rtol=1e-4)


def test_fold_rejects_non_positive_scales(models):
    var = copy.deepcopy(models[0])
    site = adaln_sites(var)["head"]
    with pytest.raises(ValueError, match="positive"):
        fold_channel_transform(var, site, -torch.ones(var.C))


def test_smoothquant_balances_activation_and_weight_maxima():
    gen = torch.Generator().manual_seed(0)
    act_absmax_C = torch.rand(16, generator=gen) * 50 + 0.1
    w_OC = torch.randn(8, 16, generator=gen)
    s_C = smoothquant_scales(act_absmax_C, w_OC, alpha=0.5)
    torch.testing.assert_close(act_absmax_C / s_C, (w_OC * s_C).abs().amax(dim=0))
    assert torch.equal(smoothquant_scales(torch.zeros(16), w_OC), torch.ones(16))  # dead channels stay put


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_symmetric_shift_centres_the_quantization_range(bits):
    lo_C, hi_C = torch.tensor([0.5, -3.0, -1.0, 2.0]), torch.tensor([4.0, 1.0, 1.0, 9.0])
    delta_C = symmetric_shift(lo_C, hi_C, bits)
    step_C, _ = qparams_minmax(lo_C, hi_C, bits)
    _, zero_C = qparams_minmax(lo_C - delta_C, hi_C - delta_C, bits)
    # the shifted range starts at −(2^(b−1) − 1) steps below zero: its zero point is that integer
    assert torch.allclose(zero_C, torch.full_like(zero_C, 2 ** (bits - 1) - 1), atol=1)
    torch.testing.assert_close(lo_C - delta_C, -(2 ** (bits - 1) - 1) * step_C, atol=step_C.max().item(), rtol=0)


def test_symmetric_shift_on_hand_values():
    # b = 4 (15 steps, 7 below zero after the shift). [−1, 2]: Δ = 0.2, z = 5 → δ = 0.2·(7 − 5) = 0.4, and
    # [−1, 2] − 0.4 = [−1.4, 1.6] = [−7Δ, 8Δ]. [−1.1, 1.9]: Δ = 0.2, z = round(5.5) = 6 → δ = 0.2; the released
    # fractional zero point 5.5 gives δ = 0.2·(7 − 5.5) = 0.3.
    lo_C, hi_C = torch.tensor([-1.0, -1.1]), torch.tensor([2.0, 1.9])
    torch.testing.assert_close(symmetric_shift(lo_C, hi_C, 4), torch.tensor([0.4, 0.2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(symmetric_shift(lo_C, hi_C, 4, fractional_zero_point=True), torch.tensor([0.4, 0.3]),
                               atol=1e-6, rtol=0)
    # 8 bits: [−3, 5.16]: Δ = 0.032, z = round(93.75) = 94 → δ = 0.032·(127 − 94) = 1.056; fractional: 1.064
    lo, hi = torch.tensor([-3.0]), torch.tensor([5.16])
    torch.testing.assert_close(symmetric_shift(lo, hi, 8), torch.tensor([1.056]), atol=1e-5, rtol=0)
    torch.testing.assert_close(symmetric_shift(lo, hi, 8, True), torch.tensor([1.064]), atol=1e-5, rtol=0)


def _released_gps_reference(x_NC, w_OC, w_hat_OC, lo_C, hi_C, bits):
    # written out from the released per-batch rule: ranges and outlier from the batch min/max; E_X with the outlier
    # channel's (Δ, z), z fractional; s_j = (s_o⁴·‖x_j‖²‖e_w,j‖² / (‖e_x,j‖²‖ŵ_j‖²))^(1/4)
    x, w, w_hat = x_NC.double(), w_OC.double(), w_hat_OC.double()
    r = x.max(0).values - x.min(0).values
    o = int(torch.argmax(r))
    s_o = (r[o] / (w[:, o].max() - w[:, o].min())).sqrt()
    step = (hi_C[o].double() - lo_C[o].double()) / (2**bits - 1)
    zero = -lo_C[o].double() / step
    xq = (torch.clamp(torch.round(x / step) + zero, 0, 2**bits - 1) - zero) * step
    s = torch.empty(x.shape[1], dtype=torch.float64)
    for j in range(x.shape[1]):
        num = x[:, j].pow(2).sum() * (w[:, j] - w_hat[:, j]).pow(2).sum()
        den = (x[:, j] - xq[:, j]).pow(2).sum() * w_hat[:, j].pow(2).sum()
        s[j] = s_o if j == o else (s_o**4 * num / den) ** 0.25
    return s, o


def test_released_gps_takes_ranges_and_outlier_from_the_batch_min_max():
    # channel 2 has one far spike: the widest by min/max (the released outlier), not by a percentile-searched range
    gen = torch.Generator().manual_seed(3)
    x_NC = torch.randn(400, 6, generator=gen) * torch.tensor([1.0, 4.0, 0.5, 2.0, 1.5, 0.8])
    x_NC[17, 2] = 40.0
    w_OC = torch.randn(5, 6, generator=gen)
    step, zero = qparams_minmax(w_OC.amin(1, keepdim=True), w_OC.amax(1, keepdim=True), 4)
    w_hat_OC = fake_quantize_affine(w_OC, step, zero, 4)
    # a per-channel quantizer with fractional zero points (the searched ranges: the spike is clipped)
    x_clipped = torch.cat((x_NC[:17], x_NC[18:]))
    lo_C, hi_C = x_clipped.amin(0), x_clipped.amax(0)
    lo_C = lo_C - 0.3 * (hi_C - lo_C) / 15
    assert int(torch.argmax(hi_C - lo_C)) == 1
    s_C, o = gps_batch_scales(x_NC, w_OC, w_hat_OC, lo_C, hi_C, 4)
    expect_C, expect_o = _released_gps_reference(x_NC, w_OC, w_hat_OC, lo_C, hi_C, 4)
    assert o == expect_o == 2
    torch.testing.assert_close(s_C.double(), expect_C, rtol=1e-4, atol=0)


def _gps_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_NC = torch.randn(256, 12, generator=gen) * torch.linspace(0.2, 3, 12)
    x_NC[:, 5] *= 15  # the outlier channel
    w_OC = torch.randn(10, 12, generator=gen)
    lo_C, hi_C = x_NC.amin(0), x_NC.amax(0)
    step, zero = qparams_minmax(w_OC.amin(1, keepdim=True), w_OC.amax(1, keepdim=True), 4)
    w_hat_OC = fake_quantize_affine(w_OC, step, zero, 4)
    stats = GPSStats.zeros(12)
    for chunk in x_NC.split(64):  # accumulated over batches
        stats.add(chunk, lo_C[5], hi_C[5], bits=4)
    return x_NC, w_OC, w_hat_OC, lo_C, hi_C, stats


def test_gps_anchor_is_the_widest_channel_with_smoothquant_scale():
    x_NC, w_OC, w_hat_OC, lo_C, hi_C, stats = _gps_problem()
    s_C, o = gps_scales(hi_C - lo_C, w_OC, w_hat_OC, stats)
    assert o == 5
    rho_o = w_OC[:, 5].max() - w_OC[:, 5].min()
    torch.testing.assert_close(s_C[5], ((hi_C[5] - lo_C[5]) / rho_o).sqrt())


def test_gps_scale_minimises_its_per_channel_objective():
    x_NC, w_OC, w_hat_OC, lo_C, hi_C, stats = _gps_problem()
    s_C, o = gps_scales(hi_C - lo_C, w_OC, w_hat_OC, stats)
    s_o = s_C[o].double()
    err_w = (w_OC - w_hat_OC).pow(2).sum(0).double()
    norm_w = w_hat_OC.pow(2).sum(0).double()
    grid_G = torch.logspace(-4, 4, 200_001, dtype=torch.float64)  # fine grid over 8 decades
    for j in range(12):
        if j == o:
            continue
        terms = (stats.err_x_C[j].double(), stats.norm_x_C[j].double(), err_w[j], norm_w[j])
        objective = gps_objective(grid_G, s_o, *terms)
        s_grid = grid_G[torch.argmin(objective)]
        assert abs(s_C[j].double() / s_grid - 1) < 1e-3, (j, s_C[j].item(), s_grid.item())
        at_closed_form = gps_objective(s_C[j].double(), s_o, *terms)
        assert at_closed_form <= objective.min() * (1 + 1e-9)


def test_gps_stats_use_the_outlier_channels_quantizer():
    x_NC, w_OC, w_hat_OC, lo_C, hi_C, stats = _gps_problem()
    step, zero = qparams_minmax(lo_C[5], hi_C[5], 4)
    expect_err_C = (x_NC - fake_quantize_affine(x_NC, step, zero, 4)).pow(2).sum(0)
    torch.testing.assert_close(stats.err_x_C, expect_err_C, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.norm_x_C, x_NC.pow(2).sum(0), rtol=1e-5, atol=1e-4)
