"""Quantized module wrappers: thin, hold the original Parameters, add quantizers around the op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import FakeQuantizer

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """An `nn.Linear` with optional weight and input fake quantizers.

    `weight` and `bias` are the wrapped Linear's own Parameters, stored directly on this module, so
    the model's parameter keys (`….weight`, `….bias`) are unchanged by swapping. Quantizer state adds
    keys under `….weight_quantizer.*` / `….input_quantizer.*`.

    `scale_idx_L` (VAR scale of every token) feeds `PerScale` input quantizers: pass it to forward, set the
    attribute, or set `token_ctx` to the model's `TokenContext` (blocks call `linear(x)`, so the scales of the
    current pass are read from there; an attribute rather than a hook, so a deep copy follows the copied model).
    `calls` counts forwards, so tests can prove that a swapped layer actually runs.
    """

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: FakeQuantizer | None = None,
        input_quantizer: FakeQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.scale_idx_L: torch.Tensor | None = None
        self.token_ctx = None
        self.calls = 0
        self._autocast_cache: tuple[torch.Tensor, torch.dtype, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.input_quantizer is not None:
            if scale_idx_L is None:
                scale_idx_L = self.scale_idx_L
            if scale_idx_L is None and self.token_ctx is not None:
                scale_idx_L = self.token_ctx.scale_idx_L
            x = self.input_quantizer(x, scale_idx_L)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(x, self._autocast_weight(weight), self.bias)

    def _autocast_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in the autocast dtype, cast once per fake-quantized weight instead of at every call.

        Autocast caches the casts of leaf Parameters only; Ŵ is a plain tensor (the weight quantizer's cached
        output), so under bf16/fp16 sampling every call cast it again (per d16 batch of rtn W4A4 on a CPU, 676 of
        the 6,912 copies). The cast is the one F.linear would do (same values); it is kept while the quantizer hands
        back the same, unmodified Ŵ object, so a recomputed Ŵ (invalidated cache, new rounding) is cast afresh.
        """
        device_type = weight.device.type
        if weight is self.weight or torch.is_grad_enabled() or not torch.is_autocast_enabled(device_type):
            return weight
        dtype = torch.get_autocast_dtype(device_type)
        held = self._autocast_cache
        if held is not None and held[0] is weight and held[1] == dtype and held[2] == weight._version:
            return held[3]
        cast = weight.to(dtype)
        # holding Ŵ itself (not its id) keeps a freed-and-reused object from ever matching
        self._autocast_cache = (weight, dtype, weight._version, cast)
        return cast

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` sharing this module's Parameters (for unswapping)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
