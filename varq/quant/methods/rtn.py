"""RTN: min-max round-to-nearest, the plain baseline (methods.md §2, §3.2 granularities, no reconstruction).

Weights: static per output channel (optionally per group of input features), fitted to the weights themselves.
Linear inputs: dynamic per token. Attention operands: dynamic, at the activation bit-width, with the §3.2
granularities; the softmax output uses a *uniform* per-row min/max grid by default, because the log2 softmax
quantizer is part of the Shift-and-Sum framework, not of plain RTN (``softmax_kind: log2`` switches it on).
Kept FP: the VQ-VAE, the embeddings (class, position, level), LayerNorm, softmax arithmetic, GELU.
Nothing here depends on data, so no calibration set is needed and a rebuild from the FP weights is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from varq.quant.factories import (
    attention_operand_specs,
    dynamic_quantizer,
    static_weight_quantizer,
    token_spec,
    weight_spec,
)
from varq.quant.methods.base import PolicyMethod
from varq.quant.model import QuantPolicy
from varq.quant.registration import MethodConfig, register_method

SOFTMAX_KINDS = ("uniform", "log2")


@dataclass
class RTNConfig(MethodConfig):
    name: str = "rtn"
    exclude: list[str] = field(default_factory=list)  # Linear FQN globs kept FP (e.g. "blocks.*.ffn.fc2")
    weight_group_size: int = 0  # 0: per output channel; G: per channel and group of G input features
    act_group_size: int = 0  # 0: per token; G: per token and group of G channels
    quantize_attention: bool = True
    softmax_kind: str = "uniform"  # uniform | log2

    def __post_init__(self) -> None:
        if self.softmax_kind not in SOFTMAX_KINDS:
            raise ValueError(f"quant.softmax_kind={self.softmax_kind!r}; choose one of {', '.join(SOFTMAX_KINDS)}")
        if self.weight_group_size < 0 or self.act_group_size < 0:
            raise ValueError("quant.weight_group_size and quant.act_group_size must be >= 0 (0 = no groups)")


def rtn_policy(config: RTNConfig) -> QuantPolicy:
    def linear_quantizers(site, linear, bits):
        w_spec = weight_spec(bits.w_bits, linear.in_features, config.weight_group_size)
        weight_q = static_weight_quantizer(linear, w_spec)
        input_q = dynamic_quantizer(token_spec(bits.a_bits, linear.in_features, config.act_group_size))
        return weight_q, input_q

    def attention_quantizers(block_idx, bits):
        specs = attention_operand_specs(bits.a_bits, softmax_kind=config.softmax_kind)
        return {name: dynamic_quantizer(spec) for name, spec in specs.items()}

    return QuantPolicy(
        linear_quantizers=linear_quantizers,
        attention_quantizers=attention_quantizers if config.quantize_attention else None,
        exclude=tuple(config.exclude),
    )


@register_method("rtn", RTNConfig)
class RTN(PolicyMethod):
    needs_calibration = False  # weight ranges come from the weights; activations are dynamic

    def policy(self, bits):
        return rtn_policy(self.config)
