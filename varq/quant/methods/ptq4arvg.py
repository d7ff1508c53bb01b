"""PTQ4ARVG (methods.md §4): SmoothQuant init, symmetric shift, GPS and STWQ, training-free, static activations.

Pipeline (§4.4), every transform folded exactly into the preceding AdaLN (`varq.quant.transforms`):

1. SmoothQuant (α = 0.5, abs-max; qkv/fc1 statistics without the sink token) on mat_qkv, fc1 and head; fold.
2. Per-channel static input quantizers on the smoothed inputs → symmetric shift δ (bias-compensated); fold.
3. Per-channel input quantizers again, per-channel weight quantizers → GPS scales (§4.5); fold.
4. Final quantizers, all the shared `FakeQuantizer` with the percentile search and EMA (§4.2): weights per output
   channel; mat_qkv/fc1 inputs STWQ (one range per VAR scale, the sink token being scale 0); proj/fc2 inputs a
   sink range and a rest range; head and ada_lin inputs per tensor; Q, K, softmax output and V per tensor. word_embed
   stays FP.

The pipeline is `varq.quant.methods._static_recipe`, shared with the SmoothQuant baseline. The folded weights differ
from the checkpoint, so the method keeps every stage's (s, δ) and its quantizer state carries them under
``transforms.<stage>.<fqn>.{scale_C,shift_C}``; loading replays the folds on the FP model, bit for bit.

Defaults reproduce the released code (docs/fidelity.md); today's alternatives are named options:

* ``masked_calibration: false`` — every calibration pass runs without the block-causal mask, as the release does
  (true: the masked pass, token for token the KV-cached pass the sampler runs).
* ``statistics: released`` — how the statistics are gathered: each static quantizer observes with the quantizers
  upstream of it switched on and keeps an EMA of its step and (fractional) zero point; the SmoothQuant and GPS
  scales are computed per calibration batch and averaged with the same EMA; the GPS outlier channel and its range
  come from each batch's min/max; the shift and GPS quantizers are per-channel on the smoothed inputs (the
  qkv/fc1 sink token left FP) inside a model whose other quantizers are already the final ones. ``statistics: fp``
  observes every quantizer on the FP model, keeps an EMA of ranges, takes SmoothQuant's running abs-max and
  evaluates GPS once on sums over all batches, with the percentile-searched per-channel ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from varq.quant.methods._static_recipe import Recipe, RecipeMethod, StaticRecipeConfig
from varq.quant.registration import register_method

__all__ = ["PTQ4ARVGConfig", "PTQ4ARVG"]


@dataclass
class PTQ4ARVGConfig(StaticRecipeConfig):
    name: str = "ptq4arvg"
    smoothquant: bool = True
    shift: bool = True
    gps: bool = True
    stwq: bool = True  # per-scale mat_qkv/fc1 inputs (False: per tensor)
    sink_split: bool = True  # proj/fc2 inputs: sink token and the rest (False: per tensor)


@register_method("ptq4arvg", PTQ4ARVGConfig)
class PTQ4ARVG(RecipeMethod):
    def recipe(self) -> Recipe:
        c = self.config
        return Recipe(smoothquant=c.smoothquant, shift=c.shift, gps=c.gps, stwq=c.stwq, sink_split=c.sink_split,
                      stats_skip_sink=True, **c.shared_recipe())
