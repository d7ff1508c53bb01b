"""Quantization: granularities, pure primitives, range estimators and THE fake quantizer."""

from .estimators import range_minmax, range_mse, range_percentile
from .granularity import PerAxes, PerChannel, PerGroup, PerScale, PerTensor, PerToken, layout_for
from .primitives import (
    dequantize,
    fake_quantize_affine,
    fake_quantize_log2,
    fake_quantize_sign_split,
    qparams_minmax,
    quantize,
    round_ste,
)
from .qmodules import QuantLinear
from .quantizer import FakeQuantizer, QuantSpec
from .rounding import AdaRoundRounding, NearestRounding, Rounding
from .swap import swap_linears, unswap_linears

__all__ = [
    "AdaRoundRounding",
    "FakeQuantizer",
    "NearestRounding",
    "PerAxes",
    "PerChannel",
    "PerGroup",
    "PerScale",
    "PerTensor",
    "PerToken",
    "QuantLinear",
    "QuantSpec",
    "Rounding",
    "dequantize",
    "fake_quantize_affine",
    "fake_quantize_log2",
    "fake_quantize_sign_split",
    "layout_for",
    "qparams_minmax",
    "quantize",
    "range_minmax",
    "range_mse",
    "range_percentile",
    "round_ste",
    "swap_linears",
    "unswap_linears",
]
