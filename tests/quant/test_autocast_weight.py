"""A fake-quantized Linear under autocast casts its Ŵ to the autocast dtype once, not at every call, with the values
F.linear's own cast gives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from varq.quant.factories import static_weight_quantizer, weight_spec
from varq.quant.qmodules import QuantLinear


def _qlinear(seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 32)
    return QuantLinear(linear, static_weight_quantizer(linear, weight_spec(4, 64)))


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_output_equals_f_linear_on_the_quantized_weight_and_the_cast_is_reused() -> None:
    q = _qlinear()
    x = torch.randn(3, 64)
    with torch.no_grad(), _bf16():
        w_hat = q.weight_quantizer(q.weight)
        expected = F.linear(x, w_hat, q.bias)  # autocast casts Ŵ itself here
        first = q(x)
        cast = q._autocast_cache[3]
        second = q(x)
        assert q._autocast_cache[3] is cast  # the second call cast nothing
    assert first.dtype == torch.bfloat16 and torch.equal(first, expected) and torch.equal(second, expected)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, w_hat.to(torch.bfloat16))


def test_a_new_quantized_weight_is_cast_afresh() -> None:
    q = _qlinear(1)
    x = torch.randn(3, 64)
    with torch.no_grad(), _bf16():
        q(x)
        old = q._autocast_cache[3]
        q.weight.mul_(0.5)  # a changed weight: the quantizer recomputes Ŵ (same ranges), which must be cast again
        got = q(x)
        expected = F.linear(x, q.weight_quantizer(q.weight), q.bias)
    assert q._autocast_cache[3] is not old
    assert torch.equal(got, expected)


def test_no_cast_is_held_in_fp32_or_with_gradients() -> None:
    q = _qlinear(2)
    x = torch.randn(3, 64)
    with torch.no_grad():
        q(x)
    assert q._autocast_cache is None
    with _bf16():
        out = q(x.requires_grad_(True))
    assert q._autocast_cache is None and out.requires_grad
