"""Compiled (fused) dynamic per-token activation quantizers for sampling: the same numbers in fewer passes.

A dynamic per-token (or per-token-group) quantizer at inference is a chain of about ten full-size elementwise passes
and two reductions (min, max, scale, round, shift, clamp, …). Each pass reads and writes the whole activation, so on a
GPU the chain is memory- and launch-bound and on a CPU every fresh temporary page-faults. `torch.compile` fuses the
chain into a reduction and one elementwise loop. The function compiled here calls the very primitives the eager
quantizer calls (`range_minmax`, `qparams_minmax` with the spec's rules, `fake_quantize_ranges`), and
`tests/quant/test_fused_quantizers.py` holds the compiled and eager outputs equal bit for bit for every kind, bit
width, granularity and dtype varq uses.

Off by default: the first call of each input rank compiles (seconds on a CPU), which only pays off over a sampling
run. `use_fused_quantizers(True)` switches it on for the process (``eval.fused_quantizers=true`` in a run,
``--fused-quantizers`` in `varq.bench`); `FakeQuantizer` then routes every eligible call here (`fusable`).
"""

from __future__ import annotations

import functools

import torch

from varq.quant.estimators import range_minmax
from varq.quant.granularity import PerGroup, PerToken, from_view, layout_for, to_view
from varq.quant.primitives import fake_quantize_ranges, qparams_minmax
from varq.quant.rounding import NearestRounding

__all__ = ["use_fused_quantizers", "fused_quantizers_enabled", "fusable", "fused_fake_quant"]

_ENABLED = {"on": False}


def use_fused_quantizers(enabled: bool) -> bool:
    """Route eligible quantizer calls through the compiled path (process-wide); returns the previous setting."""
    previous = _ENABLED["on"]
    _ENABLED["on"] = bool(enabled)
    return previous


def fused_quantizers_enabled() -> bool:
    return _ENABLED["on"]


def fusable(quantizer, x: torch.Tensor) -> bool:
    """Whether ``quantizer(x)`` may take the compiled path: a dynamic min/max per-token or per-group quantizer
    with plain rounding and nothing around it, at inference."""
    spec = quantizer.spec
    return (
        _ENABLED["on"] and spec.dynamic and spec.estimator == "minmax" and not spec.ema_qparams
        and isinstance(spec.granularity, (PerToken, PerGroup)) and spec.kind in ("uniform", "log2", "sign_split")
        and quantizer.pre_transform is None and isinstance(quantizer.rounding, NearestRounding)
        and not torch.is_grad_enabled() and x.ndim >= 1
    )


def _eager(
    x: torch.Tensor, kind: str, bits: int, group_size: int, symmetric: bool, min_step: float, clamp_zero_point: bool
) -> torch.Tensor:
    # FakeQuantizer.forward's dynamic path with its arguments spelled out (group_size 0: per token)
    granularity = PerGroup(group_size) if group_size else PerToken()
    layout = layout_for(granularity, x.shape)
    x_view = to_view(x, layout)
    lo, hi = range_minmax(x_view, layout)
    qparams = (qparams_minmax(lo, hi, bits, symmetric, eps=min_step, clamp_zero_point=clamp_zero_point)
               if kind == "uniform" else None)
    return from_view(fake_quantize_ranges(x_view, lo, hi, kind, bits, qparams), layout).to(x.dtype)


# one compiled variant per kind × bit width × group size × dtype × rank: ours W4A4 alone needs about ten, more than
# dynamo's default of 8 recompiles per function, after which it would silently fall back to eager
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled():
    # built on first use: importing varq must not import the compiler stack
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(_eager, dynamic=True)


def fused_fake_quant(quantizer, x: torch.Tensor) -> torch.Tensor:
    """``quantizer(x)`` through the compiled path (call only when `fusable` says so)."""
    spec = quantizer.spec
    group_size = spec.granularity.group_size if isinstance(spec.granularity, PerGroup) else 0
    return _compiled()(x, spec.kind, spec.bits, group_size, spec.symmetric, float(spec.min_step),
                       bool(spec.clamp_zero_point))
