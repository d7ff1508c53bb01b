"""FakeQuantizer: every kind × granularity, calibration, PerScale selection, AdaRound, state round trip."""

import io

import pytest
import torch

from varq.quant import (
    AdaRoundRounding,
    FakeQuantizer,
    PerAxes,
    PerChannel,
    PerGroup,
    PerScale,
    PerTensor,
    PerToken,
    QuantSpec,
)
from varq.quant.estimators import range_percentile
from varq.quant.granularity import layout_for, to_view

SHAPE = (2, 6, 16)  # (B, L, C); L = 6 tokens of 3 "scales" with 1, 2 and 3 tokens
SCALE_IDX_L = torch.tensor([0, 1, 1, 2, 2, 2])
GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(-1), PerToken(), PerGroup(4), PerAxes((0, 2)), PerScale(3)]
KINDS = ["uniform", "log2", "sign_split"]


def _data(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * 2 + 0.3
    return x.softmax(-1) if kind == "log2" else x


def _idx(gran):
    return SCALE_IDX_L if isinstance(gran, PerScale) else None


def _groups(x, gran):
    """Rows of the values that share one range, built independently of the quantizer's reducers."""
    if isinstance(gran, PerScale):
        return [x[:, SCALE_IDX_L == k].flatten() for k in range(gran.num_scales)]
    lay = layout_for(gran, x.shape)
    v = to_view(x, lay)
    keep = [d for d in range(v.ndim) if d not in lay.reduce_dims]
    n = 1
    for d in lay.reduce_dims:
        n *= v.shape[d]
    return list(v.permute(*keep, *lay.reduce_dims).reshape(-1, n))


@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: repr(g))
@pytest.mark.parametrize("kind", KINDS)
def test_idempotent_and_level_count(kind, gran):
    bits = 3
    fq = FakeQuantizer(QuantSpec(bits, kind, gran))
    x = _data(kind)
    y = fq(x, _idx(gran))
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(fq(y, _idx(gran)), y, rtol=1e-5, atol=1e-6)
    # uniform: 2^b codes; sign-split: 2^b - 1; log2: 2^b magnitudes plus the 0 of the "set to 0" rule
    max_levels = {"uniform": 2**bits, "sign_split": 2**bits - 1, "log2": 2**bits + 1}[kind]
    for row in _groups(y, gran):
        assert row.unique().numel() <= max_levels


@pytest.mark.parametrize("kind", KINDS)
def test_static_frozen_is_idempotent(kind):
    fq = FakeQuantizer(QuantSpec(4, kind, PerChannel(-1), dynamic=False))
    fq.observe(_data(kind, 1))
    fq.observe(_data(kind, 2))
    fq.freeze()
    y = fq(_data(kind, 3))
    torch.testing.assert_close(fq(y), y, rtol=1e-5, atol=1e-6)


def test_two_bit_uniform_on_known_data():
    fq = FakeQuantizer(QuantSpec(2, "uniform", PerToken()))
    x = torch.tensor([[0.0, 0.4, 1.6, 3.0], [-1.0, -0.6, 0.4, 2.0]])  # Δ = 1 in both rows; z = 0 and 1
    assert fq(x).tolist() == [[0.0, 0.0, 2.0, 3.0], [-1.0, -1.0, 0.0, 2.0]]


def test_dynamic_gradient_is_identity():
    # Dynamic ranges are statistics (detached) and cover all data, so nothing is clipped.
    x = torch.randn(3, 8, requires_grad=True)
    FakeQuantizer(QuantSpec(4, "uniform", PerToken()))(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 8))


def test_static_gradient_zero_where_clipped():
    fq = FakeQuantizer(QuantSpec(2, "uniform", PerTensor(), dynamic=False))
    fq.observe(torch.tensor([0.0, 3.0]))
    fq.freeze()
    x = torch.tensor([-2.0, 0.5, 2.5, 5.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_static_minmax_runs_over_batches_and_percentile_uses_ema():
    fq = FakeQuantizer(QuantSpec(8, "uniform", PerTensor(), dynamic=False))
    fq.observe(torch.tensor([-1.0, 2.0]))
    fq.observe(torch.tensor([-0.5, 5.0]))
    assert (fq.range_min.item(), fq.range_max.item()) == (-1.0, 5.0)

    spec = QuantSpec(4, "uniform", PerTensor(), dynamic=False, estimator="percentile", ema_momentum=0.1)
    fq = FakeQuantizer(spec)
    a, b = torch.randn(1000), torch.randn(1000) * 3
    fq.observe(a)
    fq.observe(b)
    lay = layout_for(PerTensor(), (1000,))
    ranges = [range_percentile(v, lay, fq._fake_quant) for v in (a, b)]
    torch.testing.assert_close(fq.range_max, 0.9 * ranges[0][1].squeeze() + 0.1 * ranges[1][1].squeeze())


def test_per_scale_selects_the_set_of_each_token():
    spec = QuantSpec(2, "uniform", PerScale(3), dynamic=False)
    fq = FakeQuantizer(spec)
    # calibration: tokens of scale k span [0, 3·(k+1)] → set k has Δ = k + 1, z = 0
    x_cal = torch.zeros(1, 6, 4)
    for tok, k in enumerate(SCALE_IDX_L.tolist()):
        x_cal[0, tok, -1] = 3.0 * (k + 1)
    fq.observe(x_cal, SCALE_IDX_L)
    fq.freeze()
    assert fq.range_max.tolist() == [3.0, 6.0, 9.0]
    x = torch.full((2, 6, 4), 1.4)
    y = fq(x, SCALE_IDX_L)
    # 1.4 with Δ = 1 → 1; Δ = 2 → 2; Δ = 3 → 0
    expected = {0: 1.0, 1: 2.0, 2: 0.0}
    for tok, k in enumerate(SCALE_IDX_L.tolist()):
        assert torch.all(y[:, tok] == expected[k])
    # a KV-cached step feeds only the tokens of one scale
    y2 = fq(torch.full((2, 3, 4), 1.4), torch.full((3,), 2))
    assert torch.all(y2 == 0.0)


def test_per_scale_needs_every_scale_and_an_index():
    fq = FakeQuantizer(QuantSpec(4, "uniform", PerScale(3), dynamic=False))
    fq.observe(torch.randn(2, 1, 4), torch.tensor([0]))
    with pytest.raises(RuntimeError):
        fq.freeze()
    fq.observe(torch.randn(2, 5, 4), torch.tensor([1, 1, 2, 2, 2]))
    fq.freeze()
    with pytest.raises(ValueError):
        fq(torch.randn(2, 6, 4))


def _frozen_weight_quantizer(w, rounding=None, gran=PerChannel(0), bits=4):
    fq = FakeQuantizer(QuantSpec(bits, "uniform", gran, dynamic=False), rounding=rounding, cache=True)
    fq.observe(w)
    fq.freeze()
    return fq


def test_adaround_init_reproduces_weight_and_hard_gives_floor_or_ceil():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    rounding = AdaRoundRounding()
    fq = _frozen_weight_quantizer(w, rounding)
    w_soft = fq(w)
    scale = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 15
    zp = torch.round(-w.amin(1, keepdim=True) / scale)
    # h(α) = frac → floor + frac = w/Δ exactly, except that the rounded zero point can push a row's
    # extreme entries up to half a step outside [0, 2^b - 1], where the clamp bites.
    inside = ((w / scale + zp) >= 0) & ((w / scale + zp) <= 15)
    torch.testing.assert_close(w_soft[inside], w[inside], rtol=0, atol=1e-5)
    assert ((w_soft - w).abs() <= scale / 2 + 1e-5).all()
    reg = rounding.regularizer(beta=2.0)
    assert 0 < reg.item() < w.numel()
    # gradients reach α only
    fq(w).pow(2).sum().backward()
    assert rounding.alpha.grad is not None and rounding.alpha.grad.abs().sum() > 0
    with torch.no_grad():
        rounding.alpha.add_(torch.randn_like(rounding.alpha))
    rounding.harden()
    offset = fq(w) / scale - torch.floor(w / scale)
    assert torch.all((offset - 0).abs().lt(1e-3) | (offset - 1).abs().lt(1e-3))
    with torch.no_grad():
        rounding.alpha.copy_(torch.where(rounding.alpha >= 0, 50.0, -50.0))
    assert rounding.regularizer(beta=2.0).item() == pytest.approx(0.0, abs=1e-3)


def test_weight_output_is_cached_and_invalidated_by_inplace_change():
    w = torch.nn.Parameter(torch.randn(4, 8))
    fq = _frozen_weight_quantizer(w, gran=PerGroup(4))
    with torch.no_grad():
        a, b = fq(w), fq(w)
        assert a is b
        w.mul_(2)
        c = fq(w)
    assert c is not a and not torch.equal(c, a)
    soft = _frozen_weight_quantizer(w.detach(), AdaRoundRounding())
    with torch.no_grad():
        assert soft(w) is not soft(w)  # soft AdaRound never caches


def test_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    wq = _frozen_weight_quantizer(w, AdaRoundRounding(), gran=PerGroup(8))
    wq(w)
    wq.rounding.harden()
    spec = QuantSpec(6, "uniform", PerScale(3), dynamic=False, estimator="percentile")
    aq = FakeQuantizer(spec)
    aq.observe(torch.randn(4, 6, 16), SCALE_IDX_L)
    aq.freeze()
    x = torch.randn(2, 6, 16)
    for fq, make, args in [
        (wq, lambda: FakeQuantizer(wq.spec, rounding=AdaRoundRounding()), (w,)),
        (aq, lambda: FakeQuantizer(spec), (x, SCALE_IDX_L)),
    ]:
        buf = io.BytesIO()
        torch.save(fq.state_dict(), buf)
        buf.seek(0)
        fresh = make()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert fresh.is_frozen
        assert torch.equal(fresh(*args), fq(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_through_quantizer(kind, dtype):
    x = _data(kind)
    fq = FakeQuantizer(QuantSpec(8, kind, PerToken(), estimator="mse", mse_candidates=5))
    y = fq(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), fq(x.to(dtype).float()), rtol=2e-2, atol=2e-2)


def test_enabled_observing_and_pre_transform():
    x = torch.randn(3, 8)
    fq = FakeQuantizer(QuantSpec(2, "uniform", PerTensor(), dynamic=False), pre_transform=lambda v: 2 * v)
    with pytest.raises(RuntimeError):
        fq(x)  # static and not calibrated
    fq.observing = True
    assert fq(x) is x
    fq.freeze()
    torch.testing.assert_close(fq.range_max, 2 * x.max())
    assert fq(x).unique().numel() <= 4
    fq.enabled = False
    assert fq(x) is x


def test_spec_validation():
    with pytest.raises(ValueError):
        QuantSpec(1, "uniform", PerTensor())
    with pytest.raises(ValueError):
        QuantSpec(4, "fp4", PerTensor())
    with pytest.raises(ValueError):
        QuantSpec(4, "log2", PerTensor(), symmetric=True)
    with pytest.raises(ValueError):
        FakeQuantizer(QuantSpec(4, "log2", PerToken()), rounding=AdaRoundRounding())
    with pytest.raises(RuntimeError):
        FakeQuantizer(QuantSpec(4, "uniform", PerToken())).observe(torch.randn(2, 4))
