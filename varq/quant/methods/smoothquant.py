"""SmoothQuant (α = 0.5) with PTQ4ARVG's static quantizers and nothing else: the baseline row of PTQ4ARVG's tables.

The smoothing scales s_j = max|X_j|^α / max|W_:,j|^(1−α) of mat_qkv, fc1 and head are folded into the preceding
AdaLN (`varq.quant.transforms`); then every quantizer is the shared static one with the percentile search and EMA
(methods.md §4.2): weights per output channel, Linear inputs and the four attention operands per tensor. No shift,
no GPS, no per-scale or sink ranges; statistics include the sink token, as plain SmoothQuant knows nothing of it.
It calibrates on the same data as PTQ4ARVG (``calib=dgc``), on the unmasked pass, and gathers its statistics as the
released PTQ4ARVG code does (``statistics``, ``masked_calibration``: see `varq.quant.methods.ptq4arvg`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from varq.quant.estimators import DEFAULT_QUANTILES
from varq.quant.methods._static_recipe import Recipe, RecipeMethod, check_common
from varq.quant.registration import MethodConfig, register_method


@dataclass
class SmoothQuantConfig(MethodConfig):
    name: str = "smoothquant"
    alpha: float = 0.5  # migration strength
    quantize_attention: bool = True  # static per-tensor Q, K, softmax output, V
    exclude: list[str] = field(default_factory=lambda: ["embed"])  # layer kinds or FQN globs kept FP
    batch_size: int = 64  # calibration rows per pass (the EMA runs over these batches)
    quantiles: list[float] = field(default_factory=lambda: list(DEFAULT_QUANTILES))
    ema_momentum: float = 0.1
    masked_calibration: bool = False
    statistics: str = "released"  # released | fp
    renamed: ClassVar[dict[str, str]] = {"keep_fp": "exclude"}

    def __post_init__(self) -> None:
        check_common(self)


@register_method("smoothquant", SmoothQuantConfig)
class SmoothQuant(RecipeMethod):
    def recipe(self) -> Recipe:
        c = self.config
        return Recipe(
            smoothquant=True, shift=False, gps=False, stwq=False, sink_split=False, stats_skip_sink=False,
            quantize_attention=c.quantize_attention, exclude=tuple(c.exclude), alpha=c.alpha,
            batch_size=c.batch_size, quantiles=tuple(c.quantiles), ema_momentum=c.ema_momentum,
            masked=c.masked_calibration, statistics=c.statistics,
        )
