"""Behaviour that a plausible edit could break without any other test noticing (scripts/mutants.py applies those
edits): every expected value here is worked out by hand in the comments, not taken from varq's own code path."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from varq.config import BitsConfig
from varq.models.adapter import LinearSite
from varq.quant.factories import static_weight_quantizer, weight_spec
from varq.quant.granularity import PerAxes
from varq.quant.methods.brecq import BrecqConfig, framework_policy
from varq.quant.methods.litevar import LiteVARConfig, litevar_policy
from varq.quant.model import quantize_var
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.recon import ReconConfig, reconstruct
from varq.quant.recon import engine as recon_engine
from varq.quant.recon.adaround import Unit, fit_unit
from varq.quant.replay import forward_kv_cached
from varq.quant.shift_sum import ShiftSumAV, key_orders, shift_sum_codes

W4A4 = BitsConfig("w4a4", 4, 4)
W4A6 = BitsConfig("w4a6", 4, 6)

FC2_SITE = LinearSite("blocks.0.ffn.fc2", "ffn_down", 0)


# ------------------------------------------------------------------------------------------------- shift-and-sum
def test_orders_are_strict_at_powers_of_two_of_theta():
    # m = clamp(ceil(log2(a/θ)), 0, 3) with θ = 1/4: a = θ·2^i lands exactly on ceil(log2) = i
    a = torch.tensor([0.25, 0.5, 1.0, 2.0, 0.2, 0.26])
    assert key_orders(a, 0.25).tolist() == [0, 1, 2, 3, 0, 1]


def test_shifted_copies_round_half_up_at_ties():
    # n = 2 copies of u = 0.25 are 0.5 and 0.0 → round half up 1 and 0 → mean 0.5; u = -0.25: 0.0 and -0.5 → 0, 0
    # → 0; n = 4 copies of u = 0.375 are 0.5, 0.75, 0.25, 0 → 1, 1, 0, 0 → 0.5; n = 8 of u = 1/16: offsets ±1/16 …
    # ±7/16 give 0.125, 0.25, 0.375, 0.5, 0, −0.125, −0.25, −0.375 → 0, 0, 0, 1, 0, 0, 0, 0 → 1/8
    u = torch.tensor([0.25, -0.25, 0.375, 1 / 16])
    order = torch.tensor([1, 1, 2, 3])
    assert shift_sum_codes(u, order).tolist() == [0.5, 0.0, 0.5, 0.125]


def test_shift_and_sum_codes_are_clamped_to_the_integer_range():
    # 2-bit V over (b, h): min −1.5, max 1.5 → Δ = 1, z = round(1.5) = 2. Key 0 (mean attention 0.9 > 2·θ, θ = 1/4)
    # has order 2: codes round_half_up(4u)/4 + z = [0.5, 3.5] → clamped to [0.5, 3] → values [−1.5, 1.0].
    # Key 1 (0.1 < θ) is plain: round(0.2) + 2 = 2 → 0.0, round(−0.7) + 2 = 1 → −1.0.
    # Output = 0.9·[−1.5, 1.0] + 0.1·[0, −1] = [−1.35, 0.8] (unclamped: [−1.35, 1.25]).
    owner = SimpleNamespace(
        v_quantizer=FakeQuantizer(QuantSpec(2, "uniform", PerAxes((0, 1)))), scale_bounds=(), block_idx=0,
    )
    v = torch.tensor([[-1.5, 1.5], [0.2, -0.7]]).view(1, 1, 2, 2)
    attn = torch.tensor([0.9, 0.1]).view(1, 1, 1, 2)
    out = ShiftSumAV(theta=0.25)(owner, attn, attn, v)
    torch.testing.assert_close(out.view(2), torch.tensor([-1.35, 0.8]))


# --------------------------------------------------------------------------------------- reconstruction engine
def _identity_unit(scale_idx_L):
    linear = nn.Linear(2, 2)
    qlinear = QuantLinear(linear, static_weight_quantizer(linear, weight_spec(4, 2)))
    return Unit("id", {"id": qlinear}, lambda x: x, scale_idx_L)


def test_loss_weighs_every_scale_equally():
    # errors e (target = x − e): row 0 has token 0 = [1, 0] (1) and tokens 1–3 = [0, 2] (4 each); row 1 has
    # token 0 = [3, 0] (9) and tokens 1–3 = 0. Scale 0 (token 0): (1 + 9)/2 = 5; scale 1 (tokens 1–3): 12/6 = 2 → 7
    # (a plain mean over rows and tokens would give 22/8 = 2.75).
    e = torch.zeros(2, 4, 2)
    e[0, 0, 0], e[0, 1:, 1], e[1, 0, 0] = 1.0, 2.0, 3.0
    x = torch.zeros(2, 4, 2)
    stats = fit_unit(_identity_unit(torch.tensor([0, 1, 1, 1])), x, x - e, ReconConfig(iters=0),
                     torch.Generator().manual_seed(0))
    assert stats.loss_rtn == pytest.approx(7.0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule(schedule, monkeypatch):
    # cosine over T = 4 steps to 0: lr_t = 0.1·(1 + cos(π t/4))/2 for t = 0..3
    lrs: list[float] = []
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    unit = _identity_unit(None)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    fit_unit(unit, x, x, ReconConfig(iters=4, lr=0.1, lr_schedule=schedule, batch_size=2, warmup=0.0),
             torch.Generator().manual_seed(0))
    expected = [0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)] if schedule == "cosine" else [0.1] * 4
    assert lrs == pytest.approx(expected)


def _ffn_input_of(var, label_N, x_NLC, kv_cached: bool) -> torch.Tensor:
    got = []
    handle = var.blocks[0].ffn.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        with torch.no_grad():
            forward_kv_cached(var, label_N, x_NLC) if kv_cached else var(label_N, x_NLC)
    finally:
        handle.remove()
    return torch.cat(got, dim=1)


@pytest.fixture(scope="module")
def unit_inputs(models, calib_set):
    """Per inputs mode: (the input reconstruct gave unit blocks.0.ffn, the reconstructed model)."""
    out = {}
    for inputs in ("fp", "quant"):
        captured = {}
        original = recon_engine.fit_unit

        def spy(unit, x_N, y_N, cfg, gen, captured=captured, original=original):
            captured[unit.name] = x_N.detach().clone()
            return original(unit, x_N, y_N, cfg, gen)

        recon_engine.fit_unit = spy
        try:
            fp = copy.deepcopy(models[0])
            qvar = quantize_var(copy.deepcopy(models[0]), framework_policy(BrecqConfig()), BitsConfig("w8a8", 8, 8))
            reconstruct(qvar, fp, calib_set, ReconConfig(iters=0, inputs=inputs), "cpu")
        finally:
            recon_engine.fit_unit = original
        out[inputs] = (captured["blocks.0.ffn"], qvar)
    return out


def test_quant_inputs_come_from_the_quantized_model_replayed_with_the_kv_cache(unit_inputs, models, calib_set):
    label_N, x_NLC = calib_set.teacher_batch(slice(None), with_uncond=True)
    got_fp, _ = unit_inputs["fp"]
    got_quant, qvar = unit_inputs["quant"]
    # fp: the FP model's own FFN input; quant: the reconstructed model's, replayed scale by scale as sampling runs it
    torch.testing.assert_close(got_fp, _ffn_input_of(models[0], label_N, x_NLC, kv_cached=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_quant, _ffn_input_of(qvar, label_N, x_NLC, kv_cached=True), atol=1e-5, rtol=1e-5)
    # …which is neither the FP input nor the quantized model's teacher-forced pass (K/V ranges over all keys)
    assert not torch.allclose(got_quant, got_fp, atol=1e-4)
    assert not torch.allclose(got_quant, _ffn_input_of(qvar, label_N, x_NLC, kv_cached=False), atol=1e-4)


# ------------------------------------------------------------------------------------------ brecq's quantizers
def test_brecq_softmax_output_is_log2():
    # s = 1; k = round(−log2 x) = 0, 1, round(1.74) = 2, round(6.64) = 7 → 1, 1/2, 1/4, 1/128
    attn_q = framework_policy(BrecqConfig()).attention_quantizers(0, W4A4)["attn_quantizer"]
    out = attn_q(torch.tensor([1.0, 0.5, 0.3, 0.01]).view(1, 1, 1, 4))
    torch.testing.assert_close(out.view(4), torch.tensor([1.0, 0.5, 0.25, 1 / 128]))


def test_brecq_fc2_input_is_sign_split():
    # 6 bits, per token: n = 2^5 − 1 = 31; Δ⁻ = 1/31 (min −1), Δ⁺ = 2/31 (max 2).
    # −0.3 → round(−9.3) = −9 → −9/31; 0.1 → round(1.55) = 2 → 4/31 (a uniform grid would give 2·3/63)
    linear = nn.Linear(256, 2)
    _, input_q = framework_policy(BrecqConfig()).linear_quantizers(FC2_SITE, linear, W4A6)
    x = torch.zeros(1, 256)
    x[0, :5] = torch.tensor([-1.0, -0.3, 0.0, 0.1, 2.0])
    torch.testing.assert_close(input_q(x)[0, :5], torch.tensor([-1.0, -9 / 31, 0.0, 4 / 31, 2.0]))


def test_brecq_groups_weights_and_activations_at_low_bits():
    # fc2 (in = 256) at W4A4: weights per 128 inputs, inputs per 64 channels. A small first group next to a large
    # second one keeps its own step: weights |ŵ − w| ≤ (0.2/15)/2, sign-split inputs ≤ (0.01/7)/2 in group one.
    # Per channel / per token the steps would be 20/15 and 5/7, and the small values would all round to 0.
    w = torch.cat((torch.linspace(-0.1, 0.1, 128), torch.linspace(-10, 10, 128))).repeat(2, 1)
    linear = nn.Linear(256, 2)
    with torch.no_grad():
        linear.weight.copy_(w)
    weight_q, input_q = framework_policy(BrecqConfig()).linear_quantizers(FC2_SITE, linear, W4A4)
    assert (weight_q(linear.weight) - w)[:, :128].abs().max() <= 0.2 / 15 / 2 + 1e-6
    x = torch.cat((torch.linspace(-0.01, 0.01, 64), torch.linspace(-5, 5, 192))).view(1, 256)
    assert (input_q(x) - x)[0, :64].abs().max() <= 0.01 / 7 / 2 + 1e-7


# ---------------------------------------------------------------------------------------------------- LiteVAR
@pytest.fixture(scope="module")
def litevar_w4a4(models):
    return quantize_var(copy.deepcopy(models[0]), litevar_policy(LiteVARConfig()), W4A4)


def test_litevar_attention_runs_at_attn_bits_whatever_the_activation_bits(litevar_w4a4):
    op = litevar_w4a4.blocks[0].attn.operand_quant
    # softmax grid {k/256}: 0.3 → round(76.8)/256 = 77/256; Q per token over [0, 1] at 8 bits: 0.25 → 64/255
    torch.testing.assert_close(op.attn_quantizer(torch.tensor([0.3])), torch.tensor([77 / 256]))
    q = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(op.q_quantizer(q).view(3), torch.tensor([0.0, 64 / 255, 1.0]))


def test_litevar_leaves_a_single_key_unquantized(litevar_w4a4):
    # one key: A ≡ 1 exactly, so the output is V itself (on the softmax grid A would be 255/256)
    op = litevar_w4a4.blocks[0].attn.operand_quant
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 1, 64, generator=gen) for _ in range(3))
    torch.testing.assert_close(op(q, k, v, None, 1.0), v, atol=0, rtol=0)


def test_litevar_keeps_fc2_in_floating_point(litevar_w4a4, models):
    fc2 = models[0].blocks[0].ffn.fc2
    x = torch.randn(3, fc2.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(litevar_w4a4.blocks[0].ffn.fc2(x), x @ fc2.weight.T + fc2.bias)
