"""SmoothQuant (α = 0.5) with PTQ4ARVG's static quantizers and nothing else: the baseline row of PTQ4ARVG's tables.

The smoothing scales s_j = max|X_j|^α / max|W_:,j|^(1−α) of mat_qkv, fc1 and head are folded into the preceding
AdaLN (`varq.quant.transforms`); then every quantizer is the shared static one with the percentile search and EMA
(methods.md §4.2): weights per output channel, Linear inputs and the four attention operands per tensor. No shift,
no GPS, no per-scale or sink ranges; statistics include the sink token, as plain SmoothQuant knows nothing of it.
It calibrates on the same data as PTQ4ARVG (``calib=dgc``), on the unmasked pass, and gathers its statistics as the
released PTQ4ARVG code does (``statistics``, ``masked_calibration``: see `varq.quant.methods.ptq4arvg`).
"""

from __future__ import annotations

from dataclasses import dataclass

from varq.quant.methods._static_recipe import Recipe, RecipeMethod, StaticRecipeConfig
from varq.quant.registration import register_method


@dataclass
class SmoothQuantConfig(StaticRecipeConfig):
    name: str = "smoothquant"


@register_method("smoothquant", SmoothQuantConfig)
class SmoothQuant(RecipeMethod):
    def recipe(self) -> Recipe:
        c = self.config
        return Recipe(smoothquant=True, shift=False, gps=False, stwq=False, sink_split=False, stats_skip_sink=False,
                      **c.shared_recipe())
