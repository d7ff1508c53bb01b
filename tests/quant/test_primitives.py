"""Primitives, granularity layouts and range estimators against closed forms written out by hand."""

import math

import pytest
import torch

from varq.quant.estimators import group_quantiles, range_minmax, range_mse, range_percentile
from varq.quant.granularity import (
    PerAxes,
    PerChannel,
    PerGroup,
    PerScale,
    PerTensor,
    PerToken,
    expand_to_view,
    layout_for,
    reduce_groups,
    to_view,
)
from varq.quant.primitives import (
    dequantize,
    fake_quantize_affine,
    fake_quantize_log2,
    fake_quantize_sign_split,
    qparams_minmax,
    quantize,
    round_ste,
)


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_qparams_minmax_closed_form():
    scale, zp = qparams_minmax(t(0.0), t(3.0), bits=2)  # 2-bit on [0, 3]: Δ = 1, z = 0
    assert scale.item() == 1.0 and zp.item() == 0.0
    scale, zp = qparams_minmax(t(-1.0), t(2.0), bits=2)  # Δ = 3/3, z = round(1/1)
    assert scale.item() == 1.0 and zp.item() == 1.0
    scale, zp = qparams_minmax(t(-7.0), t(3.0), bits=4, symmetric=True)  # Δ = 7/7, z = 8
    assert scale.item() == 1.0 and zp.item() == 8.0
    scale, zp = qparams_minmax(t(-1.0), t(14.0), bits=4)  # Δ = 15/15, z = 1
    assert scale.item() == 1.0 and zp.item() == 1.0


def test_affine_two_bit_known_values():
    x = t(-0.4, 0.2, 0.6, 1.4, 2.6, 3.7)
    out = fake_quantize_affine(x, t(1.0), t(0.0), bits=2)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 3.0, 3.0]  # -0.4 and 3.7 are clipped
    q = quantize(t(-2.0, 0.0, 0.5, 1.0), t(0.5), t(1.0), bits=3)  # codes x/0.5 + 1 clamped to [0, 7]
    assert q.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert dequantize(q, t(0.5), t(1.0)).tolist() == [-0.5, 0.0, 0.5, 1.0]


def test_zero_range_is_guarded():
    x = torch.full((4,), 0.37)
    scale, zp = qparams_minmax(x.min(), x.max(), bits=4)
    assert scale.item() > 0
    out = fake_quantize_affine(x, scale, zp, bits=4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)
    zeros = torch.zeros(3)
    assert fake_quantize_log2(zeros, 4).tolist() == [0.0, 0.0, 0.0]
    assert fake_quantize_sign_split(zeros, 4).tolist() == [0.0, 0.0, 0.0]


def test_round_ste_gradient_is_identity():
    x = torch.linspace(-3, 3, 13, requires_grad=True)
    (round_ste(x) * torch.arange(13.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(13.0))


def test_affine_gradient_passes_inside_range_and_stops_outside():
    # Documented choice: clamp after rounding, so clipped inputs get zero gradient (PACT/LSQ-style).
    x = t(-1.0, 0.2, 1.7, 2.9, 4.0).requires_grad_()
    fake_quantize_affine(x, t(1.0), t(0.0), bits=2).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_log2_closed_form_and_zero_rule():
    # b = 2: magnitudes s·{1, 1/2, 1/4, 1/8}; unclamped k >= 4 becomes 0 (not clamped to 1/8).
    x = t(1.0, 0.5, 0.3, 0.1, 0.07, 0.01, 0.0)
    # -log2: 0, 1, 1.74, 3.32, 3.84, 6.64, inf → k: 0, 1, 2, 3, 4→0, 7→0, inf→0
    expected = [1.0, 0.5, 0.25, 0.125, 0.0, 0.0, 0.0]
    assert fake_quantize_log2(x, bits=2).tolist() == expected
    assert fake_quantize_log2(2 * x, bits=2).tolist() == [2 * e for e in expected]  # s = row max = 2
    rows = torch.stack([x, 4 * x])  # one s per row
    assert fake_quantize_log2(rows, bits=2)[1].tolist() == [4 * e for e in expected]
    # explicit s smaller than the data saturates at s (k clamped at 0)
    assert fake_quantize_log2(t(3.0), bits=2, row_max=t(1.0)).item() == 1.0


def test_log2_ste_gradient():
    x = torch.rand(3, 5, requires_grad=True)
    fake_quantize_log2(x, bits=3).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 5))


def test_sign_split_closed_form_and_levels():
    # b = 3 → n = 3; x_min = -3 → Δ⁻ = 1; x_max = 6 → Δ⁺ = 2
    x = t(-3.0, -1.4, -0.2, 0.0, 0.9, 1.1, 6.0)
    assert fake_quantize_sign_split(x, bits=3).tolist() == [-3.0, -1.0, 0.0, 0.0, 0.0, 2.0, 6.0]
    # explicit range clamps: codes stay in [-n, 0] and [0, n]
    out = fake_quantize_sign_split(t(-9.0, 9.0), bits=3, x_min=t(-3.0), x_max=t(6.0))
    assert out.tolist() == [-3.0, 6.0]
    y = fake_quantize_sign_split(torch.randn(1, 4096), bits=3)
    assert y.unique().numel() <= 2**3 - 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x = torch.randn(4, 64)
    scale, zp = qparams_minmax(x.to(dtype).amin(-1, keepdim=True), x.to(dtype).amax(-1, keepdim=True), bits=4)
    assert scale.dtype == torch.float32
    ref = fake_quantize_affine(x.to(dtype).float(), scale, zp, bits=4)
    out = fake_quantize_affine(x.to(dtype), scale, zp, bits=4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    assert fake_quantize_log2(x.abs().to(dtype), 4).dtype == dtype
    assert fake_quantize_sign_split(x.to(dtype), 4).dtype == dtype


def test_layouts():
    assert layout_for(PerTensor(), (2, 3, 4)).reduce_dims == (0, 1, 2)
    assert layout_for(PerChannel(0), (8, 16)).reduce_dims == (1,)
    assert layout_for(PerChannel(-1), (2, 5, 16)).reduce_dims == (0, 1)
    assert layout_for(PerToken(), (2, 5, 16)).reduce_dims == (2,)
    lay = layout_for(PerGroup(4), (2, 5, 16))
    assert lay.reduce_dims == (3,) and to_view(torch.zeros(2, 5, 16), lay).shape == (2, 5, 4, 4)
    assert layout_for(PerAxes((0, 1, -1)), (2, 3, 7, 64)).reduce_dims == (2,)  # K per (b, h, channel)
    assert layout_for(PerAxes((0, 1)), (2, 3, 7, 64)).reduce_dims == (2, 3)  # V per (b, h)
    lay = layout_for(PerScale(3), (2, 6, 8))
    assert lay.reduce_dims == (0, 2) and lay.segment_dim == 1
    with pytest.raises(ValueError):
        layout_for(PerGroup(5), (2, 16))


def test_reduce_groups_per_scale():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    idx_L = torch.tensor([0, 1, 1, 2])
    lay = layout_for(PerScale(4), x.shape)
    mx = reduce_groups(x, lay, "amax", idx_L)
    # scale 0: token 0 → max over batch 2 = x[1,0,2] = 14; scale 1: tokens 1,2 → x[1,2,2] = 20; scale 2: 23
    assert mx[:3].tolist() == [14.0, 20.0, 23.0] and mx[3].item() == -math.inf
    assert expand_to_view(mx, lay, idx_L).shape == (4, 1)


def test_quantiles_match_torch():
    x = torch.randn(3, 257)
    lay = layout_for(PerToken(), x.shape)
    (q,) = group_quantiles(x, lay, (0.9,))
    torch.testing.assert_close(q, torch.quantile(x, 0.9, dim=-1, keepdim=True))


def _fq_uniform(bits):
    def fq(x, lo, hi):
        scale, zp = qparams_minmax(lo, hi, bits)
        return fake_quantize_affine(x, scale, zp, bits)

    return fq


def test_percentile_clips_outlier_and_mse_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(4, 4096)
    x[:, 0] = 80.0  # one huge outlier per row
    lay = layout_for(PerToken(), x.shape)
    fq = _fq_uniform(4)
    lo_mm, hi_mm = range_minmax(x, lay)
    assert torch.equal(hi_mm, torch.full((4, 1), 80.0))
    lo_p, hi_p = range_percentile(x, lay, fq)
    assert (hi_p < 80.0).all() and (lo_p > lo_mm - 1e-6).all()
    lo_s, hi_s = range_mse(x, lay, fq, p=2.0)

    def err(lo, hi):
        return (x - fq(x, lo, hi)).pow(2).sum(-1)

    assert (err(lo_s, hi_s) <= err(lo_mm, hi_mm)).all()
    assert (err(lo_s, hi_s) < err(lo_mm, hi_mm)).any()
    assert (err(lo_p, hi_p) < err(lo_mm, hi_mm)).all()
