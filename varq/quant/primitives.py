"""Pure quantization primitives: qparams, (fake-)quantization kinds, straight-through rounding.

No state lives here. Every function computes in fp32 (so fp16/bf16 inputs get fp32 qparams) and
returns the input's dtype. Without autograd (sampling, calibration passes) the same arithmetic runs in place on
one fp32 temporary instead of allocating a new full-size tensor per step (page faults of fresh allocations cost
as much as the arithmetic on a CPU); `tests/quant/test_fast_primitives.py` holds both paths bit for bit equal.

Gradients: `round_ste` passes gradients unchanged; the affine and sign-split paths clamp *after*
rounding, so the gradient w.r.t. x is 1 inside the representable range and 0 where x is clipped
(PACT/LSQ-style STE). The log2 path is a plain identity STE (softmax probabilities have no
meaningful "clipped" region: everything below the grid becomes 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "EPS",
    "Rounder",
    "round_ste",
    "qparams_minmax",
    "quantize",
    "dequantize",
    "fake_quantize_affine",
    "fake_quantize_log2",
    "fake_quantize_sign_split",
    "fake_quantize_ranges",
]

# Smallest step we allow: guards constant groups (x_max == x_min) against division by zero.
EPS = 1e-8

Rounder = Callable[[torch.Tensor], torch.Tensor]


def _no_autograd() -> bool:
    return not torch.is_grad_enabled()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) in the forward pass, identity gradient in the backward pass."""
    if _no_autograd():
        # x + (round(x) - x) == round(x) exactly: the difference is exact and the sum is representable
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")


def qparams_minmax(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool = False, eps: float = EPS,
    clamp_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of a uniform quantizer on the integer grid [0, 2^b - 1].

    Asymmetric (methods.md §2): Δ = (x_max - x_min)/(2^b - 1), z = round(-x_min/Δ).
    Symmetric: Δ = max(|x_min|, |x_max|)/(2^(b-1) - 1), z = 2^(b-1), so ±max|x| are both exact.
    Both are fp32; zero_point holds integers as floats so it broadcasts without casts. ``clamp_zero_point`` clamps
    z to [0, 2^b - 1] (the released Shift-and-Sum weight quantizer).
    """
    _check_bits(bits)
    x_min, x_max = x_min.float(), x_max.float()
    if symmetric:
        amax = torch.maximum(x_min.abs(), x_max.abs())
        scale = (amax / (2 ** (bits - 1) - 1)).clamp_min(eps)
        zero_point = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((x_max - x_min) / (2**bits - 1)).clamp_min(eps)
        zero_point = torch.round(-x_min / scale)
    if clamp_zero_point:
        zero_point = zero_point.clamp(0, 2**bits - 1)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, rounding: Rounder = round_ste
) -> torch.Tensor:
    """Integer codes clamp(rounding(x/Δ) + z, 0, 2^b - 1), as fp32 (differentiable through the STE)."""
    return torch.clamp(rounding(x.float() / scale) + zero_point, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real values Δ·(q - z) in fp32."""
    return (q - zero_point) * scale


def fake_quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, rounding: Rounder = round_ste
) -> torch.Tensor:
    """Δ·(clamp(round(x/Δ) + z, 0, 2^b - 1) - z), returned in x's dtype."""
    if _no_autograd():
        # the one fresh full-size tensor, everything after runs in place on it: a bf16/fp16 x is already copied by
        # the cast (divided in place), an fp32 x is x itself (divided into a new tensor)
        x32 = x.float()
        scaled = x32.div_(scale) if x32 is not x else x32 / scale
        codes = scaled.round_() if rounding is round_ste else rounding(scaled)
        if codes.data_ptr() == x.data_ptr():  # a rounding that returned its input: never write into the caller's x
            codes = codes.clone()
        codes.add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)
        return codes.to(x.dtype)
    return dequantize(quantize(x, scale, zero_point, bits, rounding), scale, zero_point).to(x.dtype)


def fake_quantize_log2(
    x: torch.Tensor, bits: int, row_max: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """Log2 quantizer for softmax outputs (methods.md §2), identity STE.

    s = row max (default: max |x| over the last dim), k = clamp(round(-log2(|x|/s)), 0, 2^b - 1),
    Q(x) = sign(x)·s·2^(-k); entries whose unclamped k is >= 2^b (too small for the grid) become 0.
    So there are 2^b non-zero magnitudes plus zero. Negative inputs keep their sign (softmax has none).
    """
    _check_bits(bits)
    x32 = x.float()
    if _no_autograd():
        # The same numbers with one fresh tensor and no mask: e = round(log2(|x|/s)) = -k (round half to even is
        # odd-symmetric, so negating before or after rounding is the same), and threshold_ sends every e ≤ -2^b
        # (k ≥ 2^b, below the grid) to -inf, whose exp2 is the required 0. The surviving integers are ≥ -(2^b - 1),
        # so only the upper clamp remains. NaN stays NaN (threshold_ replaces x ≤ t only).
        e = x32.abs_() if x32 is not x else x32.abs()  # a cast input is a fresh copy: no second tensor
        s = (e.amax(dim=-1, keepdim=True) if row_max is None else row_max.float()).clamp_min(eps)
        e.div_(s).log2_().round_()
        F.threshold_(e, -float(2**bits), -math.inf)
        if row_max is not None:  # with s the row's own max, |x|/s ≤ 1 and every e is ≤ 0 already
            e.clamp_(max=0)
        q = e.exp2_().mul_(s)
        # copysign == multiplying by sign(x) here: q ≥ 0, and q is 0 wherever x is 0; the sign comes from x itself
        # (x32 may hold |x| by now), which a cast to fp32 keeps bit for bit, NaN signs included
        return q.copysign_(x).to(x.dtype)
    s = x32.abs().amax(dim=-1, keepdim=True) if row_max is None else row_max.float()
    s = s.clamp_min(eps)
    k = torch.round(-torch.log2(x32.abs() / s))  # +inf for zeros, which the rule below maps to 0
    q = s * torch.exp2(-k.clamp(0, 2**bits - 1))
    q = torch.where(k >= 2**bits, torch.zeros_like(q), q) * torch.sign(x32)
    return (x32 + (q - x32).detach()).to(x.dtype)


def fake_quantize_sign_split(
    x: torch.Tensor,
    bits: int,
    x_min: torch.Tensor | None = None,
    x_max: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Sign-split quantizer for post-GELU inputs (methods.md §2): 2^b - 1 levels.

    Negatives use Δ⁻ = -x_min/(2^(b-1) - 1) with codes in [-(2^(b-1) - 1), 0]; non-negatives use
    Δ⁺ = x_max/(2^(b-1) - 1) with codes in [0, 2^(b-1) - 1]. Defaults: min/max over the last dim.
    """
    _check_bits(bits)
    x32 = x.float()
    x_min = x32.amin(dim=-1, keepdim=True) if x_min is None else x_min.float()
    x_max = x32.amax(dim=-1, keepdim=True) if x_max is None else x_max.float()
    n = 2 ** (bits - 1) - 1
    step_neg = (-x_min / n).clamp_min(eps)  # a group without negatives still gets a valid step
    step_pos = (x_max / n).clamp_min(eps)
    if _no_autograd():
        # One pass per step instead of two branches: a negative x gives a code ≤ 0 and a non-negative one a code
        # ≥ 0, so clamping to [-n, n] with the step of x's sign equals clamping each branch to its half.
        # The per-element step is lerp(Δ⁺, Δ⁻, [x < 0]): lerp returns its end points exactly at weights 0 and 1,
        # so this is torch.where(x < 0, Δ⁻, Δ⁺) bit for bit (for finite steps), and on a CPU the comparison written
        # into a float tensor plus the lerp take 40 ms where the bool mask plus a broadcasting `where` take 55 ms
        # (8M elements, one thread).
        step = torch.lerp(step_pos, step_neg, torch.lt(x32, 0, out=torch.empty_like(x32)))
        scaled = x32.div_(step) if x32 is not x else x32.div(step)  # in place only on a cast's fresh copy
        return scaled.round_().clamp_(-n, n).mul_(step).to(x.dtype)
    q_neg = torch.clamp(round_ste(x32 / step_neg), -n, 0) * step_neg
    q_pos = torch.clamp(round_ste(x32 / step_pos), 0, n) * step_pos
    return torch.where(x32 < 0, q_neg, q_pos).to(x.dtype)


def fake_quantize_ranges(
    x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, kind: str, bits: int,
    qparams: tuple[torch.Tensor, torch.Tensor] | None = None, rounding: Rounder = round_ste,
) -> torch.Tensor:
    """The fake quantizer of ``kind`` on per-group ranges [x_min, x_max] (broadcast against ``x``).

    "uniform" takes its (scale, zero_point) ``qparams`` (how they follow from the ranges is the caller's rule:
    min/max, fractional EMA …); "log2" takes max(|x_min|, |x_max|) as the reference of each row; anything else is
    sign-split with x_min and x_max as its two ends.
    """
    if kind == "uniform":
        if qparams is None:
            raise ValueError("the uniform kind needs its (scale, zero_point) qparams")
        return fake_quantize_affine(x, *qparams, bits, rounding)
    if kind == "log2":
        return fake_quantize_log2(x, bits, row_max=torch.maximum(x_min.abs(), x_max.abs()))
    return fake_quantize_sign_split(x, bits, x_min, x_max)
