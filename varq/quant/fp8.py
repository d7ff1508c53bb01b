"""``backend=fp8``: run fake-quantized Linears as FP8 (e4m3) GEMMs, for schemes scaled per token × per output channel.

Two numerics, chosen by the bit-widths:

* **integer codes (W≤4, A≤4)**: the centred codes c = q − z of a b-bit asymmetric quantizer lie in [−15, 15], and
  every integer of magnitude ≤ 16 is exact in e4m3. So the GEMM on e4m3 codes with fp32 accumulation computes
  Σ c_x·c_w exactly (|Σ| ≤ 225·K < 2^24), and y = Δ_x·Δ_w·Σ + bias is the fake quantizer's result up to one fp32
  rounding — the integer-kernel numerics at FP8 tensor-core speed. Hopper has no 4-bit tensor cores, so this is the
  fastest exact W4A4 path there.
* **e4m3 (W8A8)**: weights and activations are cast to e4m3 with a scale per output channel and per token (amax ↦
  448). This is the FP8 format, not INT8: 8-bit integer codes are not exact in e4m3, so W8A8 on this backend is a
  different quantizer (`fake_quantize_e4m3_rowwise` is its reference).

On a GPU with FP8 tensor cores (compute capability ≥ 8.9) the GEMM is ``torch._scaled_mm`` with row-wise scales;
elsewhere it is emulated in fp32 from the e4m3-cast operands (same numbers, no speed-up), which is what the CPU
tests check against the fake quantizer. Grouped scales (g128 weights, g64 activations), sign-split and static
activation ranges need per-group partial sums or other kernels and are refused with the layer named.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from varq.quant.granularity import PerChannel, PerToken
from varq.quant.primitives import qparams_minmax
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer

__all__ = ["E4M3_MAX", "FP8Linear", "apply_fp8_backend", "fake_quantize_e4m3_rowwise", "fp8_mode", "fp8_eligible", "fp8_matmul"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
Mode = Literal["int_codes", "e4m3"]


def fp8_mode(w_bits: int, a_bits: int) -> Mode:
    """Which FP8 numerics serve a bit-width pair; anything else is refused."""
    if w_bits <= 4 and a_bits <= 4:
        return "int_codes"
    if w_bits == 8 and a_bits == 8:
        return "e4m3"
    raise ValueError(
        f"backend=fp8 supports W≤4/A≤4 (integer codes, exact in e4m3) and W8A8 (e4m3); got W{w_bits}A{a_bits}: "
        f"use the default backend for it"
    )


def _rowwise_e4m3(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale (M, 1)) with each row's amax mapped to 448."""
    x32 = x_MK.float()
    scale_M1 = (x32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)
    return (x32 / scale_M1).to(E4M3), scale_M1


def fake_quantize_e4m3_rowwise(x: torch.Tensor) -> torch.Tensor:
    """The W8A8 fp8 quantizer as a fake quantizer: per-row (last dim) scaled cast to e4m3 and back."""
    codes, scale = _rowwise_e4m3(x.reshape(-1, x.shape[-1]))
    return (codes.float() * scale).reshape(x.shape).to(x.dtype)


def fp8_eligible(qlinear: QuantLinear) -> str | None:
    """None when the layer's quantizers are per output channel (weights) × dynamic per token (inputs); else why not."""
    wq, iq = qlinear.weight_quantizer, qlinear.input_quantizer
    if not isinstance(wq, FakeQuantizer) or not isinstance(iq, FakeQuantizer):
        return "needs both a weight and an input quantizer"
    if wq.spec.kind != "uniform" or iq.spec.kind != "uniform":
        return f"needs uniform quantizers (weights {wq.spec.kind}, inputs {iq.spec.kind})"
    if wq.spec.granularity != PerChannel(0) or wq.spec.dynamic or not wq.is_frozen:
        return f"weights must be static per output channel, got {wq.spec.granularity}"
    if iq.spec.granularity != PerToken() or not iq.spec.dynamic:
        return f"inputs must be dynamic per token, got {iq.spec.granularity} (dynamic={iq.spec.dynamic})"
    if iq.pre_transform is not None or wq.pre_transform is not None:
        return "pre-transforms (smoothing) are not folded into the FP8 GEMM"
    return None


class FP8Linear(nn.Module):
    """A `QuantLinear` whose GEMM runs on e4m3 operands (see the module docstring for the two numerics)."""

    def __init__(self, qlinear: QuantLinear, mode: Mode) -> None:
        super().__init__()
        reason = fp8_eligible(qlinear)
        if reason is not None:
            raise ValueError(f"backend=fp8: {reason}")
        self.mode = mode
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.bias = qlinear.bias
        self.a_bits, self.a_symmetric = qlinear.input_quantizer.spec.bits, qlinear.input_quantizer.spec.symmetric
        with torch.no_grad():
            weight = qlinear.weight.detach()
            if mode == "int_codes":
                w_hat = qlinear.weight_quantizer(weight).float()  # the learned rounding (AdaRound) included
                scale, _ = qlinear.weight_quantizer.qparams()
                scale_N1 = scale.reshape(-1, 1).float()
                codes = torch.round(w_hat / scale_N1)  # q − z, integer-valued
                if codes.abs().max() > 16:
                    raise ValueError("backend=fp8: weight codes exceed ±16, which e4m3 cannot hold exactly")
                w_e4m3, w_scale_N1 = codes.to(E4M3), scale_N1
            else:
                w_e4m3, w_scale_N1 = _rowwise_e4m3(weight)
        self.register_buffer("weight_e4m3", w_e4m3, persistent=False)
        self.register_buffer("weight_scale_N1", w_scale_N1, persistent=False)

    def _quantize_input(self, x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "e4m3":
            return _rowwise_e4m3(x_MK)
        x32 = x_MK.float()
        lo, hi = torch.aminmax(x32, dim=-1, keepdim=True)
        scale_M1, zero_point = qparams_minmax(lo, hi, self.a_bits, self.a_symmetric)
        codes = torch.round(x32 / scale_M1).add_(zero_point).clamp_(0, 2**self.a_bits - 1).sub_(zero_point)
        return codes.to(E4M3), scale_M1

    def forward(self, x: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        a_e4m3, a_scale_M1 = self._quantize_input(x.reshape(-1, shape[-1]))
        y = fp8_matmul(a_e4m3, a_scale_M1, self.weight_e4m3, self.weight_scale_N1, self.mode == "int_codes")
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(
    a_MK: torch.Tensor, a_scale_M1: torch.Tensor, w_NK: torch.Tensor, w_scale_N1: torch.Tensor, exact: bool
) -> torch.Tensor:
    """(a·Δ_a) @ (w·Δ_w)ᵀ from e4m3 operands: ``torch._scaled_mm`` where FP8 tensor cores exist, else emulated in fp32
    (products of e4m3 values are exact in fp32; accumulation is fp32 in both).

    ``exact`` (integer codes): the GEMM returns the fp32 accumulator itself and the scales are applied after it in
    fp32, so the result does not go through a bf16 output; otherwise row-wise scales inside the GEMM, bf16 output.
    """
    if _has_fp8_tensor_cores(a_MK.device):
        w_KN = w_NK.t()  # column-major, as _scaled_mm wants its second operand
        if exact:
            one = torch.ones((), device=a_MK.device, dtype=torch.float32)
            acc = torch._scaled_mm(a_MK, w_KN, scale_a=one, scale_b=one, out_dtype=torch.float32)
            return acc * a_scale_M1 * w_scale_N1.t()
        return torch._scaled_mm(
            a_MK, w_KN, scale_a=a_scale_M1, scale_b=w_scale_N1.t().contiguous(), out_dtype=torch.bfloat16
        ).float()
    return F.linear(a_MK.float(), w_NK.float()) * a_scale_M1 * w_scale_N1.t()


def apply_fp8_backend(var: nn.Module, w_bits: int, a_bits: int, strict: bool = True) -> list[str]:
    """Swap every eligible `QuantLinear` of ``var`` for an `FP8Linear` in place; returns the swapped FQNs.

    ``strict``: a quantized Linear that does not fit (groups, sign-split, static ranges) is an error naming it;
    with False it keeps the fake quantizer.
    """
    mode = fp8_mode(w_bits, a_bits)
    swapped = []
    for fqn, module in list(var.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        reason = fp8_eligible(module)
        if reason is not None:
            if strict:
                raise ValueError(f"backend=fp8: {fqn} {reason}; use the default backend for this method")
            continue
        parent_name, _, child = fqn.rpartition(".")
        setattr(var.get_submodule(parent_name) if parent_name else var, child, FP8Linear(module, mode))
        swapped.append(fqn)
    return swapped
