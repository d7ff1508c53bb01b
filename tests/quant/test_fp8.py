"""backend=fp8 numerics on the CPU (float8 casting, fp32 emulation of the GEMM) against the fake quantizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
from varq.config import BitsConfig
from varq.quant.factories import dynamic_quantizer, static_weight_quantizer, token_spec, weight_spec
from varq.quant.fp8 import E4M3_MAX, FP8Linear, apply_fp8_backend, fake_quantize_e4m3_rowwise, fp8_mode
from varq.quant.methods.ours import OursConfig, framework_policy
from varq.quant.methods.rtn import RTNConfig, rtn_policy
from varq.quant.model import quantize_var
from varq.quant.qmodules import QuantLinear


def _qlinear(bits: int, seed: int = 0, k: int = 96, n: int = 48) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    wq = static_weight_quantizer(linear, weight_spec(bits, k))
    iq = dynamic_quantizer(token_spec(bits, k))
    return QuantLinear(linear, wq, iq)


def _x(seed: int = 1, shape=(2, 7, 96)) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[0, 0, :4] = torch.tensor([9.0, -7.0, 0.0, 0.0])  # outliers and exact zeros in one token
    return x


def test_int4_codes_are_exact_in_e4m3_and_the_gemm_reproduces_integer_numerics():
    ql = _qlinear(4)
    fp8 = FP8Linear(ql, "int_codes")
    w_codes = fp8.weight_e4m3.float()
    assert torch.equal(w_codes, w_codes.round()) and w_codes.abs().max() <= 15
    # the weight codes times their scale give back exactly what the fake quantizer produced
    w_hat = ql.weight_quantizer(ql.weight.detach())
    assert torch.allclose(w_codes * fp8.weight_scale_N1, w_hat, rtol=0, atol=1e-6)

    x = _x()
    with torch.no_grad():
        y_fake = ql(x)
        y_fp8 = fp8(x)
        # exact integer reference in float64: Δx·Δw·Σ c_x c_w + b, with the activation codes of the fake quantizer
        x_hat = ql.input_quantizer(x).double()
        y_exact = F.linear(x_hat, w_hat.double(), ql.bias.double())
    assert torch.allclose(y_fp8.double(), y_exact, rtol=1e-6, atol=1e-5)
    assert torch.allclose(y_fp8, y_fake, rtol=1e-5, atol=1e-4)
    assert (y_fp8.double() - y_exact).abs().max() <= (y_fake.double() - y_exact).abs().max() + 1e-5


def test_int4_tokens_whose_range_excludes_zero_stay_exact():
    # A token whose values all share one sign has z outside [0, 15] (asymmetric rule), so its centred codes q − z
    # leave the range e4m3 holds exactly; the GEMM must still give the integer numerics (q in e4m3, z applied after).
    ql = _qlinear(4, seed=3)
    fp8 = FP8Linear(ql, "int_codes")
    x = _x(seed=4)
    x[0, 1] = 10.0 + torch.rand(96, generator=torch.Generator().manual_seed(5))  # all in [10, 11]: z = −150
    x[1, 2] = -3.0 - torch.rand(96, generator=torch.Generator().manual_seed(6))  # all negative: z > 15
    with torch.no_grad():
        _, zero_point = ql.input_quantizer.qparams(x.reshape(-1, 96))
        assert zero_point.min() < -100 and zero_point.max() > 15  # the case is really there
        x_hat = ql.input_quantizer(x).double()
        y_exact = F.linear(x_hat, ql.weight_quantizer(ql.weight.detach()).double(), ql.bias.double())
        y_fp8 = fp8(x)
    err = (y_fp8.double() - y_exact).abs()
    assert err.max() <= 1e-6 * y_exact.abs().max(), float(err.max())


def test_w8a8_is_e4m3_rowwise():
    ql = _qlinear(8)
    fp8 = FP8Linear(ql, "e4m3")
    x = _x()
    with torch.no_grad():
        y = fp8(x)
        ref = F.linear(fake_quantize_e4m3_rowwise(x), fake_quantize_e4m3_rowwise(ql.weight), ql.bias)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # each row's amax maps to the largest e4m3 value, and e4m3 keeps 3 mantissa bits (relative error ≤ 2^-4)
    w_e4m3 = fp8.weight_e4m3.float()
    assert torch.equal(w_e4m3.abs().amax(dim=1), torch.full((48,), E4M3_MAX))
    rel = (fake_quantize_e4m3_rowwise(x) - x).abs() / x.abs().clamp_min(1e-3)
    assert rel[x.abs() > 0.1].max() <= 2**-4


def test_modes_and_refusals():
    assert fp8_mode(4, 4) == "int_codes" and fp8_mode(3, 4) == "int_codes" and fp8_mode(8, 8) == "e4m3"
    with pytest.raises(ValueError, match="W4A8"):
        fp8_mode(4, 8)
    var = tiny_var()
    quantize_var(var, framework_policy(OursConfig(group_if_divisible_by=32, weight_group_size=32, act_group_size=32)),
                 BitsConfig(w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match=r"blocks\.0\..*PerGroup|blocks\.0\..*uniform"):
        apply_fp8_backend(var, 4, 4)


def test_rtn_model_on_the_fp8_backend_matches_fake_quantization():
    var = tiny_var()
    quantize_var(var, rtn_policy(RTNConfig(quantize_attention=False)), BitsConfig(w_bits=4, a_bits=4))
    label_B, x_BLCv, _ = random_teacher_batch(tiny_vqvae(), B=2, seed=4)
    with torch.no_grad():
        ref = var(label_B, x_BLCv)
        swapped = apply_fp8_backend(var, 4, 4)
        out = var(label_B, x_BLCv)
    assert len(swapped) == 2 * 5 + 3  # per block: ada_lin, mat_qkv, proj, fc1, fc2; word_embed, head_nm, head
    assert all(isinstance(var.get_submodule(f), FP8Linear) for f in swapped)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3)
