"""The in-place inference paths of the quantization primitives equal the autograd (reference) paths bit for bit.

Sampling and calibration passes run without autograd and take the in-place path; reconstruction runs with
autograd and takes the reference formulas (straight-through estimators). Both must produce the same numbers,
including ties at .5, zeros, clipped values and reduced-precision inputs.
"""

from __future__ import annotations

import pytest
import torch

from varq.quant.primitives import (
    fake_quantize_affine,
    fake_quantize_log2,
    fake_quantize_sign_split,
    qparams_minmax,
    round_ste,
)
from varq.quant.rounding import AdaRoundRounding
from varq.quant.shift_sum import shift_sum_codes


def _tricky(shape=(3, 5, 64), seed=0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    flat = x.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 1e-30, -1e-30])  # zeros, ties, tiny values
    flat[8:16] = torch.randn(8, generator=gen) * 100  # far outside the range: clipped
    return x.to(dtype)


def _both(fn, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        ref = fn(x.detach().clone().requires_grad_(), *args, **kwargs).detach()
    with torch.no_grad():
        fast = fn(x.detach().clone(), *args, **kwargs)
    return ref, fast


def test_round_ste_inference_equals_the_ste_forward():
    x = _tricky()
    ref, fast = _both(round_ste, x)
    assert torch.equal(ref, fast) and torch.equal(fast, torch.round(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_affine_inference_path_is_bit_identical(bits, symmetric, dtype):
    x = _tricky(dtype=dtype)
    lo, hi = x.float().amin(-1, keepdim=True) / 2, x.float().amax(-1, keepdim=True) / 2  # half range: clipping
    scale, zp = qparams_minmax(lo, hi, bits, symmetric)
    ref, fast = _both(fake_quantize_affine, x, scale, zp, bits)
    assert fast.dtype == dtype and torch.equal(ref, fast)


def test_affine_inference_path_with_adaround_and_the_input_untouched():
    w = _tricky((16, 32), seed=3)
    scale, zp = qparams_minmax(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), 4)
    ada = AdaRoundRounding()
    ada.init_from(w / scale)
    for hard in (False, True):
        ada.hard.fill_(hard)
        with torch.enable_grad():
            ref = fake_quantize_affine(w, scale, zp, 4, ada).detach()
        before = w.clone()
        with torch.no_grad():
            fast = fake_quantize_affine(w, scale, zp, 4, ada)
        assert torch.equal(ref, fast) and torch.equal(w, before)
    identity = lambda t: t  # noqa: E731 - a rounding that hands back its input must not be written into
    with torch.no_grad():
        x = _tricky((4, 8))
        x_before = x.clone()
        fake_quantize_affine(x, torch.tensor(1.0), torch.tensor(0.0), 8, identity)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("row_max", [None, "given"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_inference_path_is_bit_identical(bits, row_max):
    attn = _tricky((2, 3, 7, 40), seed=bits).softmax(-1)
    attn[0, 0, 0, :5] = 0.0  # exact zeros (masked keys)
    attn[1, 2, 3, :3] = -attn[1, 2, 3, :3]  # the sign must survive
    rm = attn.abs().amax(-1, keepdim=True) * 0.8 if row_max == "given" else None
    ref, fast = _both(fake_quantize_log2, attn, bits, row_max=rm)
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 6])
def test_sign_split_inference_path_is_bit_identical(bits, dtype):
    x = torch.nn.functional.gelu(_tricky(seed=bits), approximate="tanh").to(dtype)
    ref, fast = _both(fake_quantize_sign_split, x, bits)
    assert fast.dtype == dtype and torch.equal(ref, fast)
    lo, hi = torch.tensor(-0.05), x.float().amax() / 3  # static ranges that clip both sides
    ref, fast = _both(fake_quantize_sign_split, x, bits, lo, hi)
    assert torch.equal(ref, fast)
    positive_only = x.float().abs()
    ref, fast = _both(fake_quantize_sign_split, positive_only, bits)
    assert torch.equal(ref, fast)


def test_shift_sum_codes_inference_path_is_bit_identical():
    u = _tricky((2, 4, 30, 16), seed=7)
    order = torch.randint(0, 4, (2, 4, 30, 1), generator=torch.Generator().manual_seed(1))
    ref, fast = _both(shift_sum_codes, u, order)
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("method", ["rtn", "ours"])
def test_quantized_model_logits_equal_with_and_without_autograd(method):
    from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
    from varq.config import BitsConfig
    from varq.quant.methods.ours import OursConfig, framework_policy
    from varq.quant.methods.rtn import RTNConfig, rtn_policy
    from varq.quant.model import quantize_var
    from varq.quant.replay import forward_kv_cached
    from varq.quant.shift_sum import install_shift_sum

    var = tiny_var()
    policy = rtn_policy(RTNConfig(softmax_kind="log2")) if method == "rtn" else framework_policy(OursConfig())
    quantize_var(var, policy, BitsConfig(w_bits=4, a_bits=4))
    if method == "ours":
        install_shift_sum(var, theta=0.02)
    label_B, x_BLCv, _ = random_teacher_batch(tiny_vqvae(), B=4, seed=2)
    with torch.enable_grad():
        ref = forward_kv_cached(var, label_B, x_BLCv, num_cond=2).detach()
    with torch.no_grad():
        fast = forward_kv_cached(var, label_B, x_BLCv, num_cond=2)
    assert torch.equal(ref, fast)


def test_recon_gemm_precision_is_validated_and_a_no_op_on_cpu():
    from varq.quant.recon.adaround import gemm_precision
    from varq.quant.recon.config import ReconConfig

    assert ReconConfig(gemm_precision="bf16").gemm_precision == "bf16"
    with pytest.raises(ValueError, match="gemm_precision"):
        ReconConfig(gemm_precision="fp16")
    x = torch.randn(4, 4)
    with gemm_precision("bf16", x.device):
        assert (x @ x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 7, 8, 16])
def test_log2_inference_path_keeps_nan_signs_and_the_grid(bits, dtype):
    attn = _tricky((2, 3, 5, 300), seed=bits).softmax(-1) ** 3  # a long tail far below a 2- or 4-bit grid
    attn[0, 0, 0, :4] = torch.tensor([0.0, -0.0, float("nan"), -1e-30])
    attn[1, 1, 1, :2] = -attn[1, 1, 1, :2]
    attn = attn.to(dtype)
    # a static row max below some entries: their codes would be negative and clamp to the top level
    row_max = attn.float().nan_to_num().abs().amax(-1, keepdim=True) * 0.5
    for rm in (None, row_max):
        ref, fast = _both(fake_quantize_log2, attn, bits, row_max=rm)
        assert fast.dtype == dtype
        nan = ref.isnan()
        assert torch.equal(fast.isnan(), nan) and bool(nan.any())  # NaN stays NaN (a NaN row max: the whole row)
        assert torch.equal(ref[~nan], fast[~nan])
        # every output carries the sign bit of its input, zeros included (the STE path's x + (q - x) makes them +0)
        assert torch.equal(fast.signbit()[~nan], attn.signbit()[~nan])
    levels = fake_quantize_log2(attn.float().nan_to_num().abs(), bits, row_max=row_max)
    ratio = (levels / row_max)[levels > 0]
    assert torch.equal(torch.log2(ratio), torch.log2(ratio).round())  # powers of two of the row max ...
    assert int((-torch.log2(ratio)).max()) <= 2**bits - 1  # ... no lower than 2^-(2^b - 1)


def test_forward_with_qparams_is_forward_and_qparams_from_one_estimate():
    from varq.quant.granularity import PerAxes
    from varq.quant.quantizer import FakeQuantizer, QuantSpec

    v = _tricky((2, 3, 40, 8), seed=4)
    q = FakeQuantizer(QuantSpec(4, "uniform", PerAxes((0, 1))))
    out, scale, zero_point = q.forward_with_qparams(v)
    ref_scale, ref_zero_point = q.qparams(v)
    assert torch.equal(out, q(v)) and torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)
    assert scale.shape == (2, 3, 1, 1)
    with pytest.raises(ValueError, match="dynamic uniform"):
        FakeQuantizer(QuantSpec(4, "log2", PerAxes((0, 1)))).forward_with_qparams(v)
    q.enabled = False
    with pytest.raises(RuntimeError, match="enabled"):
        q.forward_with_qparams(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
def test_dynamic_row_log2_quantizer_equals_its_range_path(bits, dtype):
    # At inference a dynamic per-row log2 quantizer skips its min/max reductions and lets the primitive take the row
    # max of |x|; the result must be what the explicit range (max(|min|, |max|) per row) gives, signs, zeros and
    # NaN rows included, and with autograd on (the range path) the same again.
    from varq.quant.granularity import PerToken
    from varq.quant.quantizer import FakeQuantizer, QuantSpec

    attn = _tricky((2, 3, 7, 40), seed=bits).softmax(-1)
    attn[0, 0, 0, :5] = 0.0
    attn[1, 2, 3, :3] = -attn[1, 2, 3, :3] * 2  # a negative entry that is the row's largest magnitude
    attn[0, 1, 2, 7] = float("nan")
    attn = attn.to(dtype)
    q = FakeQuantizer(QuantSpec(bits, "log2", PerToken()))
    a32 = attn.float()
    row_max = torch.maximum(a32.amin(-1, keepdim=True).abs(), a32.amax(-1, keepdim=True).abs())
    with torch.enable_grad():
        expected = fake_quantize_log2(attn, bits, row_max=row_max)
    with torch.no_grad():
        fast = q(attn)
    with torch.enable_grad():
        slow = q(attn)
    assert fast.dtype == dtype
    assert torch.equal(fast.isnan(), expected.isnan()) and torch.equal(fast.nan_to_num(), expected.nan_to_num())
    assert torch.equal(slow.nan_to_num(), expected.nan_to_num())
    assert float(fast[1, 2, 3].min()) < 0  # the sign survives the fast path


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_softmax_in_place_equals_the_plain_softmax(with_bias):
    # At inference on a CPU the explicit attention's softmax is written over its own fresh logits; the values must
    # equal the out-of-place softmax and neither operand may change.
    from varq.quant.attention import _softmax

    q, k = _tricky((2, 3, 9, 16), seed=3), _tricky((2, 3, 11, 16), seed=4)
    bias = torch.zeros(9, 11).masked_fill(torch.rand(9, 11, generator=torch.Generator().manual_seed(0)) < 0.3,
                                          float("-inf")) if with_bias else None
    q0, k0 = q.clone(), k.clone()
    logits = q @ k.transpose(-2, -1) * 0.25 + (0 if bias is None else bias)
    expected = logits.softmax(-1)
    with torch.no_grad():
        got = _softmax(q, k, bias, 0.25, torch.float32)
    assert torch.equal(got, expected) and torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inference_paths_never_write_into_their_input(dtype):
    # A bf16/fp16 input is cast to a fresh fp32 copy that the fast paths then reuse in place; an fp32 input is the
    # caller's own tensor and must come back untouched.
    x = _tricky((4, 64), seed=5).to(dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, -1e-3], dtype=dtype)
    before = x.clone()
    scale, zp = qparams_minmax(x.float().amin(-1, keepdim=True), x.float().amax(-1, keepdim=True), 4)
    with torch.no_grad():
        outs = [fake_quantize_affine(x, scale, zp, 4), fake_quantize_log2(x, 4), fake_quantize_sign_split(x, 4)]
    assert torch.equal(x, before) and torch.equal(x.signbit(), before.signbit())
    for out, fn in zip(outs, (lambda t: fake_quantize_affine(t, scale, zp, 4), lambda t: fake_quantize_log2(t, 4),
                              lambda t: fake_quantize_sign_split(t, 4))):
        with torch.enable_grad():
            ref = fn(x.detach().requires_grad_(True)).detach()
        assert out.dtype == dtype and torch.equal(out, ref)
