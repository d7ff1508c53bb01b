"""LiteVAR's quantization (methods.md §5.2): RTN with FP fc2 and 8-bit attention.

* every Linear except ``ffn.fc2`` (the one layer whose quantization alone wrecks FID) is quantized;
* weights: per output channel, asymmetric min/max with LiteVAR's step Δ = range/2^b (not /(2^b − 1)), so the top
  level clips slightly — realised by shrinking the fitted max to min + range·(2^b − 1)/2^b, which gives that Δ and
  the same zero point with the shared quantizer;
* Linear inputs: dynamic per token;
* attention at ``attn_bits`` (8) in every W/A setting: Q and K per (b, h, token), V per (b, h, channel) across
  tokens, the softmax output on the fixed grid {0, 1/2^b, …, (2^b − 1)/2^b}; A and V stay FP when a single key exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from varq.quant.factories import (
    dynamic_quantizer,
    fixed_range_quantizer,
    static_weight_quantizer,
    token_spec,
    weight_spec,
)
from varq.quant.granularity import PerAxes, PerToken
from varq.quant.methods.base import PolicyMethod
from varq.quant.model import QuantPolicy
from varq.quant.quantizer import QuantSpec
from varq.quant.registration import MethodConfig, register_method


@dataclass
class LiteVARConfig(MethodConfig):
    name: str = "litevar"
    exclude: list[str] = field(default_factory=lambda: ["ffn_down"])  # layer kinds or FQN globs kept FP
    attn_bits: int = 8  # attention operands, independent of the W/A bit-widths (config names w4a4attn8 …)
    renamed: ClassVar[dict[str, str]] = {"keep_fp": "exclude"}

    def __post_init__(self) -> None:
        if not 2 <= self.attn_bits <= 16:
            raise ValueError(f"quant.attn_bits must be in [2, 16], got {self.attn_bits}")


@torch.no_grad()
def _clip_top_level_(quantizer) -> None:
    n = 2**quantizer.spec.bits
    quantizer.range_max = quantizer.range_min + (quantizer.range_max - quantizer.range_min) * (n - 1) / n
    quantizer.invalidate_cache()


def litevar_policy(config: LiteVARConfig) -> QuantPolicy:
    def linear_quantizers(site, linear, bits):
        weight_q = static_weight_quantizer(linear, weight_spec(bits.w_bits, linear.in_features))
        _clip_top_level_(weight_q)
        return weight_q, dynamic_quantizer(token_spec(bits.a_bits, linear.in_features))

    def attention_quantizers(block_idx, bits):
        b = config.attn_bits
        return {
            "q_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerToken())),
            "k_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerToken())),
            "attn_quantizer": fixed_range_quantizer(b, 0.0, (2**b - 1) / 2**b),
            "v_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerAxes((0, 1, 3)))),
        }

    return QuantPolicy(
        linear_quantizers=linear_quantizers, attention_quantizers=attention_quantizers,
        exclude=tuple(config.exclude), skip_single_key=True,
    )


@register_method("litevar", LiteVARConfig)
class LiteVAR(PolicyMethod):
    needs_calibration = False  # only weight ranges are static, and they come from the weights

    def policy(self, bits):
        return litevar_policy(self.config)
