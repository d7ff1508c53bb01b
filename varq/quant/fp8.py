"""``backend=fp8``: run fake-quantized Linears as FP8 (e4m3) GEMMs, for schemes scaled per token × per output channel.

Two numerics, chosen by the bit-widths:

* **integer codes (W≤4, A≤4)**: the GEMM takes the activations' uncentred codes q ∈ [0, 15] and the weights'
  centred codes c_w = q_w − z_w ∈ [−15, 15] (the weight zero point is clamped to the grid); every integer of
  magnitude ≤ 16 is exact in e4m3, so with fp32 accumulation Σ q·c_w is exact (|Σ| ≤ 225·K < 2^24), and
  y = Δ_x·Δ_w·(Σ q·c_w − z_x·Σ c_w) + bias is the fake quantizer's result up to fp32 rounding — the integer-kernel
  numerics at FP8 tensor-core speed. (Centring the activations first would not be exact: a token whose values
  share one sign has z_x outside [0, 15].) Hopper has no 4-bit tensor cores, so this is the fastest exact W4A4 path
  there.
* **e4m3 (W8A8)**: weights and activations are cast to e4m3 with a scale per output channel and per token (amax ↦
  448). This is the FP8 format, not INT8: 8-bit integer codes are not exact in e4m3, so W8A8 on this backend is a
  different quantizer (`fake_quantize_e4m3_rowwise` is its reference).

On a GPU with FP8 tensor cores (compute capability ≥ 8.9) the GEMM is ``torch._scaled_mm`` with row-wise scales;
elsewhere it is emulated in fp32 from the e4m3-cast operands (same numbers, no speed-up), which is what the CPU
tests check against the fake quantizer. Grouped scales (g128 weights, g64 activations), sign-split and static
activation ranges need per-group partial sums or other kernels and are refused with the layer named.

Only Linears change: attention operands (Q, K, softmax, V) keep the method's fake quantizers, and layers the method
keeps FP stay FP. `fp8_run_problem` decides from a run's configuration, before anything is calibrated or written,
whether every Linear the method quantizes will fit (per method, see `FP8_METHOD_RULES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from varq.quant.granularity import PerChannel, PerToken
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer

__all__ = ["E4M3_MAX", "FP8_METHOD_RULES", "FP8Linear", "apply_fp8_backend", "fake_quantize_e4m3_rowwise", "fp8_mode",
           "fp8_eligible", "fp8_matmul", "fp8_run_problem"]

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
        # the layer's own input quantizer supplies (Δ, z) per token, so its step floor and zero-point rules hold
        self.input_quantizer = qlinear.input_quantizer
        self.a_bits = qlinear.input_quantizer.spec.bits
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
        # integer codes only: Σ_k c_w[n, k] per output channel (integers, exact in fp32), the zero-point term below
        code_sum_1N = codes.sum(dim=1).reshape(1, -1) if mode == "int_codes" else None
        self.register_buffer("weight_code_sum_1N", code_sum_1N, persistent=False)

    def _input_codes(self, x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q as e4m3, Δ (M, 1), z (M, 1)): the input quantizer's uncentred codes q = clamp(round(x/Δ) + z, 0, 2^b − 1).

        The GEMM takes q, not q − z: q ∈ [0, 15] is always exact in e4m3, while q − z leaves [−16, 16] for a token
        whose range excludes 0 (all values of one sign give z < 0 or z > 2^b − 1 under the asymmetric rule).
        """
        x32 = x_MK.float()
        scale, zero_point = self.input_quantizer.qparams(x32)
        scale_M1, zero_M1 = scale.reshape(-1, 1).float(), zero_point.reshape(-1, 1).float()
        codes = torch.round(x32 / scale_M1).add_(zero_M1).clamp_(0, 2**self.a_bits - 1)
        return codes.to(E4M3), scale_M1, zero_M1

    def forward(self, x: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x_MK = x.reshape(-1, shape[-1])
        if self.mode == "int_codes":
            q_e4m3, a_scale_M1, zero_M1 = self._input_codes(x_MK)
            # Σ_k (q − z)·c_w = Σ_k q·c_w − z·Σ_k c_w. |Σ q·c_w| ≤ 225·K stays an exact fp32 integer (K < 74k); the
            # correction is exact while |z·Σ c_w| < 2^24 and otherwise rounds once, like the fake quantizer's GEMM
            acc_MN = codes_matmul_fp32(q_e4m3, self.weight_e4m3) - zero_M1 * self.weight_code_sum_1N
            y = acc_MN * a_scale_M1 * self.weight_scale_N1.t()
        else:
            a_e4m3, a_scale_M1 = _rowwise_e4m3(x_MK)
            y = fp8_matmul(a_e4m3, a_scale_M1, self.weight_e4m3, self.weight_scale_N1, exact=False)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def codes_matmul_fp32(a_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """a @ wᵀ of e4m3 operands as the fp32 accumulator, unscaled: ``torch._scaled_mm`` with unit scales where FP8
    tensor cores exist, else emulated in fp32 (products of e4m3 values are exact in fp32)."""
    if has_fp8_tensor_cores(a_MK.device):
        one = torch.ones((), device=a_MK.device, dtype=torch.float32)
        return torch._scaled_mm(a_MK, w_NK.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    with torch.autocast(a_MK.device.type, enabled=False):  # under fp16/bf16 sampling autocast would round them
        return F.linear(a_MK.float(), w_NK.float())


def fp8_matmul(
    a_MK: torch.Tensor, a_scale_M1: torch.Tensor, w_NK: torch.Tensor, w_scale_N1: torch.Tensor, exact: bool
) -> torch.Tensor:
    """(a·Δ_a) @ (w·Δ_w)ᵀ from e4m3 operands: ``torch._scaled_mm`` where FP8 tensor cores exist, else emulated in fp32
    (products of e4m3 values are exact in fp32; accumulation is fp32 in both).

    ``exact`` (integer codes): the GEMM returns the fp32 accumulator itself and the scales are applied after it in
    fp32, so the result does not go through a bf16 output; otherwise row-wise scales inside the GEMM, bf16 output.
    """
    if exact:
        return codes_matmul_fp32(a_MK, w_NK) * a_scale_M1 * w_scale_N1.t()
    if has_fp8_tensor_cores(a_MK.device):
        w_KN = w_NK.t()  # column-major, as _scaled_mm wants its second operand
        return torch._scaled_mm(
            a_MK, w_KN, scale_a=a_scale_M1, scale_b=w_scale_N1.t().contiguous(), out_dtype=torch.bfloat16
        ).float()
    # autocast off: under fp16/bf16 sampling the emulated GEMM would otherwise round the codes' products
    with torch.autocast(a_MK.device.type, enabled=False):
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


# ------------------------------------------------------------------------------------- per-method eligibility
def _grouped_framework(quant: Any, w_bits: int, a_bits: int) -> str | None:
    """Shift-and-Sum's framework (brecq, ours, ours_litevar): grouped scales below ``group_below_bits``."""
    divisor = quant.group_if_divisible_by or quant.weight_group_size
    if divisor <= 0:
        return None
    grouped = []
    if w_bits < quant.group_below_bits and quant.weight_group_size > 0:
        grouped.append(f"weights g{quant.weight_group_size}")
    if a_bits < quant.group_below_bits and quant.act_group_size > 0:
        grouped.append(f"inputs g{quant.act_group_size}")
    if not grouped:
        return None
    return (f"quant={quant.name} uses grouped scales below {quant.group_below_bits} bits ({', '.join(grouped)}), which "
            "need per-group partial sums, not one FP8 GEMM; set quant.weight_group_size=0 quant.act_group_size=0 "
            "(per-channel weights, per-token inputs) or use backend=fake")


def _framework_rule(quant: Any, w_bits: int, a_bits: int) -> str | None:
    """brecq / ours / ours_litevar: the fc2 input is sign-split unless fc2 is kept FP; grouped scales at 4 bits;
    at W8A8 the e4m3 weights would replace the AdaRound rounding the calibration learned, so that is refused too."""
    if "ffn_down" not in quant.exclude:
        return (f"quant={quant.name} quantizes the input of the FFN down-projection (ffn_down) with the sign-split "
                "quantizer, which has no FP8 GEMM form; keep that layer FP (quant.exclude=[ffn_down], as "
                "quant=ours_litevar does) or use backend=fake")
    grouped = _grouped_framework(quant, w_bits, a_bits)
    if grouped is not None:
        return grouped
    if fp8_mode(w_bits, a_bits) == "e4m3" and quant.iters > 0:
        return (f"W8A8 on backend=fp8 casts the weights to e4m3, discarding the AdaRound rounding quant={quant.name} "
                "learns; set quant.iters=0 (round-to-nearest weights) or use backend=fake")
    return None


def _rtn_rule(quant: Any, w_bits: int, a_bits: int) -> str | None:
    if quant.weight_group_size > 0 or quant.act_group_size > 0:
        return ("quant=rtn with grouped scales (quant.weight_group_size / quant.act_group_size > 0) needs per-group "
                "partial sums, not one FP8 GEMM; set both to 0 or use backend=fake")
    return None


def _static_rule(quant: Any, w_bits: int, a_bits: int) -> str | None:
    return (f"quant={quant.name} uses static per-tensor / per-scale input ranges and smoothing transforms folded into "
            "AdaLN, while the FP8 GEMM quantizes inputs dynamically per token; use backend=fake")


def _fp16_rule(quant: Any, w_bits: int, a_bits: int) -> str | None:
    return "quant=fp16 quantizes nothing, so backend=fp8 has no layer to run; use backend=fake"


# Which methods fit, decided from their config alone. Every Linear a method quantizes must fit (no silently mixed
# run): rtn and litevar fit as configured (per-channel weights, dynamic per-token inputs); the Shift-and-Sum
# framework fits only with fc2 FP and without groups; the static recipes never fit.
FP8_METHOD_RULES: dict[str, Callable[[Any, int, int], str | None]] = {
    "fp16": _fp16_rule,
    "rtn": _rtn_rule,
    "litevar": lambda quant, w_bits, a_bits: None,
    "brecq": _framework_rule,
    "ours": _framework_rule,
    "ours_litevar": _framework_rule,
    "ptq4arvg": _static_rule,
    "smoothquant": _static_rule,
}


def fp8_run_problem(quant: Any, w_bits: int, a_bits: int) -> str | None:
    """Why a run of method config ``quant`` at W``w_bits``A``a_bits`` cannot use backend=fp8 (None: it can).

    Decided before calibration; `apply_fp8_backend` (strict) still checks every layer when the model exists."""
    try:
        fp8_mode(w_bits, a_bits)
    except ValueError:
        return (f"backend=fp8 runs bits=w4a4 (integer codes, exact in e4m3) or bits=w8a8 (e4m3), not "
                f"bits=w{w_bits}a{a_bits}; choose one of those bit-widths or use backend=fake")
    rule = FP8_METHOD_RULES.get(quant.name)
    if rule is None:
        return (f"backend=fp8 has no eligibility rule for quant={quant.name}; add one to "
                "varq.quant.fp8.FP8_METHOD_RULES or use backend=fake")
    return rule(quant, w_bits, a_bits)
