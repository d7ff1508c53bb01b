"""Ready-made quantizer configurations shared by methods (all built from THE `FakeQuantizer`).

Granularities follow methods.md §3.2 unless a method overrides them: weights per output channel (or per group of
input features), Linear inputs dynamic per token (or per token and group), and the four attention operands.
"""

from __future__ import annotations

import torch
from torch import nn

from varq.quant.granularity import PerAxes, PerChannel, PerGroup, PerTensor, PerToken
from varq.quant.quantizer import FakeQuantizer, Kind, QuantSpec
from varq.quant.rounding import Rounding

__all__ = [
    "weight_spec",
    "token_spec",
    "static_weight_quantizer",
    "dynamic_quantizer",
    "fixed_range_quantizer",
    "attention_operand_specs",
]


def _grouped(features: int, group_size: int) -> bool:
    # a group is only worth its name if it splits the row (Shift-and-Sum: word_embed, in=32, stays per channel)
    return 0 < group_size < features and features % group_size == 0


def weight_spec(bits: int, in_features: int, group_size: int = 0, estimator: str = "minmax") -> QuantSpec:
    """Static asymmetric weight spec: per output channel, or per channel and group of ``group_size`` inputs."""
    granularity = PerGroup(group_size) if _grouped(in_features, group_size) else PerChannel(0)
    return QuantSpec(bits, "uniform", granularity, dynamic=False, estimator=estimator)


def token_spec(bits: int, in_features: int, group_size: int = 0, kind: Kind = "uniform") -> QuantSpec:
    """Dynamic asymmetric activation spec: min/max per token (2-D inputs: per sample), optionally per group."""
    granularity = PerGroup(group_size) if _grouped(in_features, group_size) else PerToken()
    return QuantSpec(bits, kind, granularity, dynamic=True)


@torch.no_grad()
def static_weight_quantizer(linear: nn.Linear, spec: QuantSpec, rounding: Rounding | None = None) -> FakeQuantizer:
    """A weight quantizer whose ranges are fitted to ``linear.weight`` now (weights need no calibration data).

    The output is cached while the weight tensor is unchanged, so sampling pays for quantizing each weight once.
    """
    quantizer = FakeQuantizer(spec, rounding=rounding, cache=True).to(linear.weight.device)
    quantizer.observe(linear.weight.detach())
    quantizer.freeze()
    return quantizer


def dynamic_quantizer(spec: QuantSpec) -> FakeQuantizer:
    if not spec.dynamic:
        raise ValueError("dynamic_quantizer needs a dynamic spec")
    return FakeQuantizer(spec)


@torch.no_grad()
def fixed_range_quantizer(bits: int, lo: float, hi: float) -> FakeQuantizer:
    """A per-tensor uniform quantizer frozen on [lo, hi] (a data-independent grid, e.g. LiteVAR's softmax)."""
    quantizer = FakeQuantizer(QuantSpec(bits, "uniform", PerTensor(), dynamic=False))
    quantizer.observe(torch.tensor([lo, hi]))
    quantizer.freeze()
    return quantizer


def attention_operand_specs(bits: int, softmax_kind: Kind = "log2") -> dict[str, QuantSpec]:
    """The dynamic attention quantizers of methods.md §3.2 for (B, H, L, c) operands.

    Q per (b, h, query token) over head_dim; K per (b, h, channel) over every cached key; the softmax output per
    (b, h, query row) (log2 with the row max in Shift-and-Sum); V per (b, h) over all cached tokens and channels.
    """
    return {
        "q_quantizer": QuantSpec(bits, "uniform", PerToken()),
        "k_quantizer": QuantSpec(bits, "uniform", PerAxes((0, 1, 3))),
        "attn_quantizer": QuantSpec(bits, softmax_kind, PerToken()),
        "v_quantizer": QuantSpec(bits, "uniform", PerAxes((0, 1))),
    }
