"""Shift-and-Sum's quantizer framework (methods.md §3.2), shared by ``ours`` (with shift-and-sum) and ``brecq``
(without): the config keys of the layout and the one policy that builds it.

* weights of every Linear: static asymmetric min/max per output channel; below ``group_below_bits`` per channel and
  group of ``weight_group_size`` inputs where grouping applies; with the released (Δ, z) rule (z clamped to
  [0, 2^b − 1], Δ ≥ ``weight_min_step``). Reconstruction later swaps in AdaRound rounding;
* Linear inputs: dynamic per token (2-D ada_lin inputs: per sample); below ``group_below_bits`` per token and group
  of ``act_group_size`` channels where grouping applies; the fc2 input (post-GELU) with the sign-split quantizer;
* attention: Q per (b, h, token); K per (b, h, channel) over every cached key, below ``group_below_bits`` per
  (b, h, key token); the softmax output log2 per row; V per (b, h).

Grouping applies to a Linear whose in_features is a multiple of ``group_if_divisible_by`` (0: of
``weight_group_size``, and never when that is 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from varq.quant.factories import (
    attention_operand_specs,
    dynamic_quantizer,
    static_weight_quantizer,
    token_spec,
    weight_spec,
)
from varq.quant.granularity import PerToken
from varq.quant.model import QuantPolicy
from varq.quant.quantizer import QuantSpec
from varq.quant.recon.config import ReconMethodConfig

__all__ = ["FrameworkConfig", "framework_policy", "released_weight_spec"]


@dataclass
class FrameworkConfig(ReconMethodConfig):
    """The framework's layout keys and the AdaRound reconstruction keys (`ReconMethodConfig`)."""

    exclude: list[str] = field(default_factory=list)  # Linear FQN globs kept FP
    group_below_bits: int = 6  # bit-widths below this use groups and per-key K (W4/A4)
    weight_group_size: int = 128  # 0: never grouped
    act_group_size: int = 64
    group_if_divisible_by: int = 0  # groups only where in_features % this == 0 (0: % weight_group_size)
    # weight (Δ, z) as the released weight quantizer computes them: z clamped to [0, 2^b - 1], Δ ≥ 1e-6
    weight_zero_point_clamp: bool = True
    weight_min_step: float = 1e-6

    def __post_init__(self) -> None:
        self.recon_config()  # validates the reconstruction fields at start-up
        if min(self.weight_group_size, self.act_group_size, self.group_if_divisible_by) < 0:
            raise ValueError("quant.weight_group_size, quant.act_group_size and quant.group_if_divisible_by must be "
                             ">= 0 (0 = no groups / the weight group size)")
        if not self.weight_min_step > 0:
            raise ValueError(f"quant.weight_min_step must be > 0, got {self.weight_min_step}")


def released_weight_spec(spec: QuantSpec, clamp_zero_point: bool, min_step: float) -> QuantSpec:
    """``spec`` with the released weight quantizer's (Δ, z) rule: Δ floored at ``min_step`` and, when
    ``clamp_zero_point``, z clamped to [0, 2^b - 1] (a channel whose range excludes 0 then clips at its far end)."""
    return dataclasses.replace(spec, clamp_zero_point=clamp_zero_point, min_step=min_step)


def _group(config: FrameworkConfig, bits: int, in_features: int, group_size: int) -> int:
    divisor = config.group_if_divisible_by or config.weight_group_size
    grouped = bits < config.group_below_bits and divisor > 0 and in_features % divisor == 0
    return group_size if grouped else 0


def framework_policy(config: FrameworkConfig) -> QuantPolicy:
    """The framework's quantizers (module docstring), weights rounding to nearest until `reconstruct` switches
    them to AdaRound."""

    def linear_quantizers(site, linear, bits):
        w_group = _group(config, bits.w_bits, linear.in_features, config.weight_group_size)
        w_spec = released_weight_spec(
            weight_spec(bits.w_bits, linear.in_features, w_group), config.weight_zero_point_clamp,
            config.weight_min_step,
        )
        weight_q = static_weight_quantizer(linear, w_spec)
        a_group = _group(config, bits.a_bits, linear.in_features, config.act_group_size)
        kind = "sign_split" if site.kind == "ffn_down" else "uniform"  # post-GELU input
        return weight_q, dynamic_quantizer(token_spec(bits.a_bits, linear.in_features, a_group, kind=kind))

    def attention_quantizers(block_idx, bits):
        specs = attention_operand_specs(bits.a_bits, softmax_kind="log2")
        if bits.a_bits < config.group_below_bits:
            specs["k_quantizer"] = QuantSpec(bits.a_bits, "uniform", PerToken())  # per (b, h, key) over channels
        return {name: dynamic_quantizer(spec) for name, spec in specs.items()}

    return QuantPolicy(linear_quantizers, attention_quantizers, exclude=tuple(config.exclude))
