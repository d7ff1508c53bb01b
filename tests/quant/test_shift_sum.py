"""Shift-and-sum A·V quantization (methods.md §3.3): the closed form, the orders, the error it removes, both passes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.tiny import PATCH_NUMS, random_teacher_batch, tiny_var, tiny_vqvae
from varq.config import BitsConfig
from varq.quant.attention import AttentionOperandQuant
from varq.quant.factories import dynamic_quantizer
from varq.quant.granularity import PerAxes
from varq.quant.methods.ours import OursConfig, ShiftAndSum
from varq.quant.quantizer import QuantSpec
from varq.quant.replay import forward_kv_cached
from varq.quant.shift_sum import (
    ShiftSumAV,
    key_orders,
    record_importance,
    round_half_up,
    set_theta,
    shift_sum_codes,
    shifted_average,
)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_shifted_average_is_rounding_on_a_finer_grid(m):
    n = 2**m
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(m), dtype=torch.float64) * 40 - 20
    closed = round_half_up(n * u) / n
    assert torch.equal(shifted_average(u, n), closed)
    assert torch.equal(shift_sum_codes(u, torch.full_like(u, m)), closed)
    # the error variance drops from Δ²/12 to Δ²/(12·4^m)
    assert abs(((closed - u) ** 2).mean().item() * 12 * 4**m - 1) < 0.02


def test_orders_follow_ceil_log2_and_gradients_pass_straight_through():
    a = torch.rand(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = 0.037
    expected = torch.ceil(torch.log2(a / theta)).clamp(0, 3).long()
    assert torch.equal(key_orders(a, theta), expected)
    assert int(key_orders(torch.zeros(3), theta).sum()) == 0 and int(key_orders(torch.ones(3), theta, 2).max()) == 2
    u = torch.randn(10, requires_grad=True)
    shift_sum_codes(u, torch.full((10,), 2)).sum().backward()
    assert torch.equal(u.grad, torch.ones(10))


def _owner(bits: int, patch_nums=()) -> AttentionOperandQuant:
    ends = torch.tensor([pn * pn for pn in patch_nums], dtype=torch.long).cumsum(0).tolist()
    bounds = list(zip([0, *ends[:-1]], ends))
    v_q = dynamic_quantizer(QuantSpec(bits, "uniform", PerAxes((0, 1))))
    return AttentionOperandQuant(v_quantizer=v_q, scale_bounds=bounds, block_idx=0)


def _dominated_attention(seed: int, B=2, H=4, L=4, S=16, c=64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, L, S, generator=gen)
    dominant = torch.randint(S, (B, H, 3), generator=gen)  # a few keys soak up most of the attention
    logits.scatter_add_(-1, dominant.unsqueeze(2).expand(B, H, L, 3), torch.full((B, H, L, 3), 4.0))
    return logits.softmax(-1), torch.randn(B, H, S, c, generator=gen)


def test_lowers_av_error_on_dominant_keys_at_the_same_bits():
    owner = _owner(bits=4)
    plain, ss = ShiftSumAV(theta=math.inf), ShiftSumAV(theta=0.05)
    err_plain = err_ss = 0.0
    for seed in range(8):
        attn, v = _dominated_attention(seed)
        ref = attn @ v
        err_plain += (plain(owner, attn, attn, v) - ref).pow(2).sum().item()
        err_ss += (ss(owner, attn, attn, v) - ref).pow(2).sum().item()
    assert err_ss < 0.5 * err_plain
    # θ = inf is exactly V's own quantizer
    attn, v = _dominated_attention(0)
    torch.testing.assert_close(plain(owner, attn, attn, v), attn @ owner.v_quantizer(v), atol=0, rtol=0)


def test_teacher_forced_pass_equals_the_cached_scales():
    # L = S = all tokens with the block-causal mask: each scale must get what the KV-cached step computes for it.
    owner, ss = _owner(4, PATCH_NUMS), ShiftSumAV(theta=0.02)
    ends = torch.tensor([pn * pn for pn in PATCH_NUMS]).cumsum(0).tolist()
    L = ends[-1]
    scale_L = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(PATCH_NUMS)])
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, L, L, generator=gen) * 3
    logits = logits.masked_fill(scale_L.view(L, 1) < scale_L.view(1, L), -math.inf)
    attn, v = logits.softmax(-1), torch.randn(2, 2, L, 64, generator=gen)
    full = ss(owner, attn, attn, v)
    begin = 0
    for end in ends:
        step = ss(owner, attn[:, :, begin:end, :end], attn[:, :, begin:end, :end], v[:, :, :end])
        torch.testing.assert_close(full[:, :, begin:end], step, atol=1e-6, rtol=0)
        begin = end


@pytest.fixture(scope="module")
def quantized():
    var, vqvae = tiny_var(), tiny_vqvae()
    qvar = ShiftAndSum(OursConfig(iters=0, shift_sum=True, reestimate_theta=False)).quantize(
        copy.deepcopy(var), BitsConfig("w4a4", 4, 4))
    return qvar, vqvae


def test_model_records_every_block_and_scale_and_theta_changes_the_output(quantized):
    qvar, vqvae = quantized
    label_B, x_BLC, _ = random_teacher_batch(vqvae, B=2, seed=1)
    with torch.no_grad(), record_importance(qvar) as records:
        off = forward_kv_cached(qvar, label_B, x_BLC, num_cond=1)
    assert sorted((r.block_idx, r.scale_idx) for r in records) == [(b, k) for b in range(2) for k in range(3)]
    assert all(r.importance_BHS.shape == (2, 1, sum(pn * pn for pn in PATCH_NUMS[: r.scale_idx + 1])) for r in records)
    assert all(torch.allclose(r.importance_BHS.sum(-1), torch.ones(2, 1)) for r in records)  # rows of a softmax
    set_theta(qvar, 0.01)
    try:
        with torch.no_grad():
            on = forward_kv_cached(qvar, label_B, x_BLC, num_cond=1)
            teacher = qvar(label_B, x_BLC)
    finally:
        set_theta(qvar, math.inf)
    assert not torch.equal(on, off) and bool(torch.isfinite(teacher).all())
