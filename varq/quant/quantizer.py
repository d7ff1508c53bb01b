"""THE fake quantizer: one module for weights and activations of every method.

Methods configure it with a `QuantSpec` and plug in parts instead of subclassing it:
a `Rounding` (nearest, AdaRound, later shift-and-sum), a range estimator (min-max, percentile,
MSE, chosen by the spec), and an optional `pre_transform` (smoothing scales, ...).

State is the clipping range (`range_min`, `range_max`) per group; every kind derives its qparams
from it (uniform: Δ and z, log2: the reference max, sign-split: Δ⁻ and Δ⁺), so one state format and
one code path serve all kinds. Dynamic specs keep no state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .estimators import DEFAULT_QUANTILES, range_minmax, range_mse, range_percentile
from .fused import fusable, fused_fake_quant
from .granularity import (
    Granularity,
    Layout,
    PerAxes,
    PerChannel,
    PerGroup,
    PerScale,
    PerTensor,
    PerToken,
    expand_to_view,
    from_view,
    layout_for,
    to_view,
)
from .primitives import (
    EPS,
    fake_quantize_affine,
    fake_quantize_log2,
    fake_quantize_ranges,
    qparams_minmax,
    round_ste,
)
from .rounding import NearestRounding, Rounding

__all__ = ["QuantSpec", "FakeQuantizer"]

Kind = Literal["uniform", "log2", "sign_split"]
Estimator = Literal["minmax", "percentile", "mse"]
_KINDS = ("uniform", "log2", "sign_split")
_ESTIMATORS = ("minmax", "percentile", "mse")
_GRANULARITIES = (PerTensor, PerChannel, PerToken, PerGroup, PerAxes, PerScale)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to; how parts (rounding, transforms) plug in is the quantizer's business.

    Args:
        bits: bit-width b (2..16).
        kind: "uniform" (affine), "log2" (softmax outputs) or "sign_split" (post-GELU).
        granularity: which elements share a range (see `granularity.py`).
        symmetric: uniform only; z = 2^(b-1) and Δ from max|x|.
        dynamic: ranges from every input (no state) or from calibration (`observe` → `freeze`).
        estimator: "minmax", "percentile" (PTQ4ARVG search) or "mse" (BRECQ shrink search).
        ema_momentum: static percentile/mse ranges are averaged over batches as
            r ← (1 - m)·r + m·r_batch (PTQ4ARVG uses m = 0.1; the first batch initialises).
        quantiles: percentile candidates q; each tries [quantile(1 - q), quantile(q)].
        mse_p: norm of the MSE search (BRECQ: 2.4).
        mse_candidates: number of 1% shrink steps tried (BRECQ: 80).
        ema_qparams: uniform static ranges only; the EMA runs on the step and zero point (Δ, z) of every batch
            instead of its range, so z becomes fractional (released PTQ4ARVG). The stored range is the one that
            reproduces them, [−z·Δ, (2^b − 1 − z)·Δ], and the forward keeps z unrounded.
        clamp_zero_point: uniform only; clamp z to [0, 2^b - 1] (the released Shift-and-Sum weight quantizer:
            a range that excludes 0 then clips at the far end instead of shifting the grid).
        min_step: floor of the uniform step Δ (guards constant groups; the released weight quantizer uses 1e-6).
    """

    bits: int
    kind: Kind
    granularity: Granularity
    symmetric: bool = False
    dynamic: bool = True
    estimator: Estimator = "minmax"
    ema_momentum: float = 0.1
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    mse_p: float = 2.4
    mse_candidates: int = 80
    ema_qparams: bool = False
    clamp_zero_point: bool = False
    min_step: float = EPS

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {self.bits}")
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.granularity, _GRANULARITIES):
            raise TypeError(f"granularity must be one of {[g.__name__ for g in _GRANULARITIES]}")
        if self.symmetric and self.kind != "uniform":
            raise ValueError("symmetric applies to the uniform kind only")
        if not 0.0 < self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in (0, 1], got {self.ema_momentum}")
        if self.ema_qparams and (self.kind != "uniform" or self.symmetric or self.dynamic):
            raise ValueError("ema_qparams needs a static asymmetric uniform spec")
        if not all(0.5 < q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be in (0.5, 1], got {self.quantiles}")
        if not self.min_step > 0:
            raise ValueError(f"min_step must be > 0, got {self.min_step}")


class FakeQuantizer(nn.Module):
    """Quantize-dequantize with a `QuantSpec`; straight-through gradients.

    Args:
        spec: the numerics.
        rounding: uniform kind only; default round-to-nearest (STE). `AdaRoundRounding` learns it.
        pre_transform: applied to the input before anything else (observe included); None by default.
        cache: reuse the output while the input is the same unmodified tensor (weights). Caching is
            skipped while gradients flow or while the rounding is being learned. After changing a
            pre_transform's state in place, call `invalidate_cache()`.

    Static use: `observe(x)` over calibration batches (or set `observing = True` and run the model:
    forward then records and returns x unchanged), then `freeze()`. `PerScale` specs take the VAR
    scale of every token (dim -2) as `scale_idx_L` in `observe` and `forward`.
    """

    def __init__(
        self,
        spec: QuantSpec,
        rounding: Rounding | None = None,
        pre_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = False,
    ) -> None:
        super().__init__()
        if rounding is not None and spec.kind != "uniform":
            raise ValueError(f"a custom rounding needs the uniform kind, got {spec.kind!r}")
        self.spec = spec
        self.rounding = rounding if rounding is not None else NearestRounding()
        self.pre_transform = pre_transform
        self.enabled = True
        self.observing = False
        self.cache = cache
        self._cached: tuple[torch.Tensor, int, Hashable, torch.Tensor] | None = None
        # Empty until the first observe(): shapes depend on the tensor (and are restored on load).
        self.register_buffer("range_min", torch.empty(0))
        self.register_buffer("range_max", torch.empty(0))
        self.register_buffer("num_observed", torch.empty(0, dtype=torch.long))
        self.register_buffer("frozen", torch.tensor(False))

    # ---------------------------------------------------------------- numerics
    def _fake_quant(
        self, x_view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rounding: Rounding | None = None
    ) -> torch.Tensor:
        spec = self.spec
        qparams = self._qparams(lo, hi) if spec.kind == "uniform" else None
        # NearestRounding is round_ste; passing the function itself lets the primitive round in place
        rounder = round_ste if rounding is None or isinstance(rounding, NearestRounding) else rounding
        return fake_quantize_ranges(x_view, lo, hi, spec.kind, spec.bits, qparams, rounder)

    def _score_quant(self, x_view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        # candidate ranges of one batch are scored with their own, integer zero point (also under ema_qparams)
        if not self.spec.ema_qparams:
            return self._fake_quant(x_view, lo, hi)
        scale, zero_point = qparams_minmax(lo, hi, self.spec.bits)
        return fake_quantize_affine(x_view, scale, zero_point, self.spec.bits)

    def _estimate(
        self, x_view: torch.Tensor, layout: Layout, scale_idx_L: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        spec, x_view = self.spec, x_view.detach()
        if spec.estimator == "minmax":
            return range_minmax(x_view, layout, scale_idx_L)
        if spec.estimator == "percentile":
            return range_percentile(x_view, layout, self._score_quant, spec.quantiles, scale_idx_L)
        return range_mse(x_view, layout, self._score_quant, spec.mse_p, spec.mse_candidates, scale_idx_L=scale_idx_L)

    # ---------------------------------------------------------------- calibration
    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> None:
        """Accumulate range statistics of a calibration batch (static specs only)."""
        if self.spec.dynamic:
            raise RuntimeError("a dynamic quantizer has no statistics; observe() needs dynamic=False")
        if self.is_frozen:
            raise RuntimeError("quantizer is frozen; call reset() before observing again")
        if self.pre_transform is not None:
            x = self.pre_transform(x)
        layout = layout_for(self.spec.granularity, x.shape)
        lo, hi = self._estimate(to_view(x.float(), layout), layout, scale_idx_L)
        if layout.segment_dim is not None:
            idx_L = scale_idx_L.to(device=lo.device, dtype=torch.long).flatten()  # type: ignore[union-attr]
            present = torch.bincount(idx_L, minlength=layout.num_segments) > 0
        else:
            lo, hi = _strip_leading_ones(lo), _strip_leading_ones(hi)
            present = torch.ones((), dtype=torch.bool, device=lo.device)
        if self.num_observed.numel() == 0 and self.num_observed.ndim == 1:
            self.range_min = torch.zeros_like(lo)
            self.range_max = torch.zeros_like(hi)
            self.num_observed = torch.zeros(present.shape, dtype=torch.long, device=lo.device)
        if self.range_min.shape != lo.shape:
            raise ValueError(
                f"range shape changed from {tuple(self.range_min.shape)} to {tuple(lo.shape)}: a static "
                f"{type(self.spec.granularity).__name__} range must not depend on the batch layout"
            )
        first = self.num_observed == 0
        if self.spec.estimator == "minmax":  # running min/max over all batches
            new_min = torch.where(first, lo, torch.minimum(self.range_min, lo))
            new_max = torch.where(first, hi, torch.maximum(self.range_max, hi))
        elif self.spec.ema_qparams:  # EMA of per-batch (Δ, z), z left fractional (released PTQ4ARVG)
            m, levels = self.spec.ema_momentum, 2**self.spec.bits - 1
            step_b, zero_b = qparams_minmax(lo, hi, self.spec.bits)
            step_old, zero_old = _fractional_qparams(self.range_min, self.range_max, self.spec.bits)
            step = torch.where(first, step_b, (1 - m) * step_old + m * step_b)
            zero = torch.where(first, zero_b, (1 - m) * zero_old + m * zero_b)
            new_min, new_max = -zero * step, (levels - zero) * step
        else:  # EMA of per-batch searched ranges (PTQ4ARVG)
            m = self.spec.ema_momentum
            new_min = torch.where(first, lo, (1 - m) * self.range_min + m * lo)
            new_max = torch.where(first, hi, (1 - m) * self.range_max + m * hi)
        self.range_min = torch.where(present, new_min, self.range_min)
        self.range_max = torch.where(present, new_max, self.range_max)
        self.num_observed = self.num_observed + present.long()

    def freeze(self) -> None:
        """End calibration: forward uses the stored ranges from now on."""
        if self.spec.dynamic:
            raise RuntimeError("a dynamic quantizer has nothing to freeze")
        if self.num_observed.numel() == 0 or bool((self.num_observed == 0).any()):
            missing = (self.num_observed == 0).nonzero().flatten().tolist() if self.num_observed.ndim else []
            raise RuntimeError(f"freeze() before any observe() (unobserved scales: {missing})")
        self.frozen.fill_(True)
        self.observing = False
        self.invalidate_cache()

    def reset(self) -> None:
        """Forget statistics and unfreeze."""
        device = self.frozen.device
        self.range_min, self.range_max = torch.empty(0, device=device), torch.empty(0, device=device)
        self.num_observed = torch.empty(0, dtype=torch.long, device=device)
        self.frozen.fill_(False)
        self.invalidate_cache()

    def qparams(
        self, x: torch.Tensor | None = None, scale_idx_L: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform (scale, zero_point) in the parameter shape: stored (static) or from `x` (dynamic)."""
        if self.spec.kind != "uniform":
            raise ValueError("qparams() is defined for the uniform kind only; use range_min/range_max")
        lo, hi = self._ranges(x, scale_idx_L)[:2] if x is not None else (self.range_min, self.range_max)
        return self._qparams(lo, hi)

    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.ema_qparams:
            return _fractional_qparams(lo, hi, spec.bits)
        return qparams_minmax(lo, hi, spec.bits, spec.symmetric, eps=spec.min_step,
                              clamp_zero_point=spec.clamp_zero_point)

    # ---------------------------------------------------------------- forward
    def invalidate_cache(self) -> None:
        self._cached = None

    def _ranges(
        self, x: torch.Tensor, scale_idx_L: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        layout = layout_for(self.spec.granularity, x.shape)
        if self.spec.dynamic:
            lo, hi = self._estimate(to_view(x, layout), layout, scale_idx_L)
        else:
            if not self.is_frozen:
                raise RuntimeError("static quantizer used before calibration: observe() then freeze()")
            lo, hi = self.range_min, self.range_max
        return lo, hi, layout

    def forward(self, x: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observe(x, scale_idx_L)
            return x
        token = self._cache_token(x, scale_idx_L)
        if token is not None and self._cached is not None:
            src, version, old_token, out = self._cached
            if src is x and version == x._version and old_token == token:
                return out
        x_in = x if self.pre_transform is None else self.pre_transform(x)
        if fusable(self, x_in):  # opt-in compiled path, bit-identical (varq.quant.fused)
            out = fused_fake_quant(self, x_in)
            self._cached = (x, x._version, token, out) if token is not None else None
            return out
        if self._row_log2(x_in):
            # max(|min|, |max|) of a row is the max of |x| over it, which the primitive takes from the |x| it
            # computes anyway: the same numbers without the two range reductions over the whole softmax
            out = fake_quantize_log2(x_in, self.spec.bits)
            self._cached = (x, x._version, token, out) if token is not None else None
            return out
        lo, hi, layout = self._ranges(x_in, scale_idx_L)
        lo, hi = expand_to_view(lo, layout, scale_idx_L), expand_to_view(hi, layout, scale_idx_L)
        out = from_view(self._fake_quant(to_view(x_in, layout), lo, hi, self.rounding), layout).to(x_in.dtype)
        # Holding a reference to x (not its address) so a freed-and-reused address never hits.
        self._cached = (x, x._version, token, out) if token is not None else None
        return out

    def _row_log2(self, x: torch.Tensor) -> bool:
        # a dynamic min/max log2 quantizer per row of the last dim, at inference (the softmax of Shift-and-Sum)
        spec = self.spec
        return (
            spec.kind == "log2" and spec.dynamic and spec.estimator == "minmax" and isinstance(spec.granularity, PerToken)
            and not torch.is_grad_enabled() and x.ndim >= 1
        )

    def forward_with_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward(x)`` and the uniform (scale, zero_point) it used, from one range estimate.

        For a dynamic uniform quantizer without a pre-transform that is on and not observing (shift-and-sum's V):
        `qparams(x)` after `forward(x)` would estimate the ranges of x a second time.
        """
        spec = self.spec
        if spec.kind != "uniform" or not spec.dynamic or self.pre_transform is not None:
            raise ValueError("forward_with_qparams needs a dynamic uniform quantizer without a pre_transform")
        if not self.enabled or self.observing:
            raise RuntimeError("forward_with_qparams needs an enabled quantizer that is not observing")
        lo, hi, layout = self._ranges(x, None)
        out = from_view(self._fake_quant(to_view(x, layout), lo, hi, self.rounding), layout).to(x.dtype)
        return (out, *self._qparams(lo, hi))

    def _cache_token(self, x: torch.Tensor, scale_idx_L: torch.Tensor | None) -> Hashable | None:
        if not self.cache or scale_idx_L is not None:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None  # the output carries a graph that must not be reused across steps
        rounding_token = getattr(self.rounding, "cache_token", lambda: None)()
        if rounding_token is None:
            return None
        return (rounding_token, bool(self.frozen), x.dtype, tuple(x.shape))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Range buffers are shaped by calibration; adopt the stored shapes so a fresh instance loads.
        for name in ("range_min", "range_max", "num_observed"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        self.invalidate_cache()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        state = "dynamic" if s.dynamic else ("frozen" if self.is_frozen else "calibrating")
        return (
            f"bits={s.bits}, kind={s.kind}, granularity={s.granularity}, symmetric={s.symmetric}, "
            f"estimator={s.estimator}, {state}, enabled={self.enabled}"
        )


def _fractional_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (Δ, z) of a range stored by an ema_qparams quantizer: the inverse of [−z·Δ, (2^b − 1 − z)·Δ], z unrounded
    step = ((hi.float() - lo.float()) / (2**bits - 1)).clamp_min(EPS)
    return step, -lo.float() / step


def _strip_leading_ones(p: torch.Tensor) -> torch.Tensor:
    # Static ranges must broadcast against any batch size and rank: (1, 1, C) → (C,), (1, 1) → ().
    while p.ndim > 0 and p.shape[0] == 1:
        p = p[0]
    return p
