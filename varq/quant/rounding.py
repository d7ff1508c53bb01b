"""Pluggable rounding for the uniform quantizer: nearest (default) and AdaRound.

A rounding maps x/Δ (in the quantizer's grouped view) to integer-valued codes before the zero point
is added and the result clamped. `cache_token()` tells the quantizer whether its output may be
cached: None while the rounding is still being learned.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .primitives import round_ste

__all__ = ["Rounding", "NearestRounding", "AdaRoundRounding"]


@runtime_checkable
class Rounding(Protocol):
    """Protocol: `rounding(x_scaled) -> codes` plus a cache token (None = do not cache)."""

    def __call__(self, x_scaled: torch.Tensor) -> torch.Tensor: ...

    def cache_token(self) -> Hashable | None: ...


class NearestRounding(nn.Module):
    """Round to nearest with a straight-through gradient; stateless."""

    def forward(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return round_ste(x_scaled)

    def cache_token(self) -> Hashable | None:
        return 0


class AdaRoundRounding(nn.Module):
    """AdaRound (Nagel et al. 2020, as used by BRECQ and Shift-and-Sum, methods.md §3.6).

    codes = floor(x/Δ) + h(α) with the rectified sigmoid h(α) = clamp(sigmoid(α)(ζ - γ) + γ, 0, 1).
    α is created on the first call (or by `init_from`) so that h(α) equals the fractional part of
    x/Δ, i.e. the soft-quantized weight starts at the FP weight. `harden()` switches to
    floor + [α >= 0]. The input (a weight) is treated as a constant: only α receives gradients.
    """

    def __init__(self, zeta: float = 1.1, gamma: float = -0.1) -> None:
        super().__init__()
        self.zeta, self.gamma = zeta, gamma
        self.alpha = nn.Parameter(torch.empty(0))
        # A buffer (not a Python bool) so the hard/soft state saves in the state_dict.
        self.register_buffer("hard", torch.tensor(False))

    @property
    def initialized(self) -> bool:
        return self.alpha.numel() > 0

    @torch.no_grad()
    def init_from(self, x_scaled: torch.Tensor) -> None:
        """Set α so that h(α) = x_scaled - floor(x_scaled)."""
        x32 = x_scaled.detach().float()
        frac = x32 - torch.floor(x32)
        p = ((frac - self.gamma) / (self.zeta - self.gamma)).clamp(1e-6, 1 - 1e-6)
        self.alpha = nn.Parameter(torch.log(p) - torch.log1p(-p))
        self.hard.fill_(False)

    def h(self) -> torch.Tensor:
        """Rectified sigmoid h(α) ∈ [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def forward(self, x_scaled: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.init_from(x_scaled)
        if self.alpha.shape != x_scaled.shape:
            raise ValueError(f"AdaRound α has shape {tuple(self.alpha.shape)}, input {tuple(x_scaled.shape)}")
        base = torch.floor(x_scaled.detach().float())
        if bool(self.hard):
            return base + (self.alpha >= 0).to(base.dtype)
        return base + self.h()

    def regularizer(self, beta: float) -> torch.Tensor:
        """Σ(1 - |2h(α) - 1|^β): pushes every h(α) towards 0 or 1 (anneal β from 20 to 2)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        """Freeze the learned rounding as floor + [α >= 0]."""
        self.hard.fill_(True)

    def cache_token(self) -> Hashable | None:
        if not bool(self.hard):
            return None  # soft mode: α is being learned, every call must recompute
        return ("hard", self.alpha.data_ptr(), self.alpha._version)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # α's shape is only known once initialised; adopt the stored shape so a fresh instance loads.
        key = prefix + "alpha"
        if key in state_dict and state_dict[key].shape != self.alpha.shape:
            self.alpha = nn.Parameter(torch.empty_like(state_dict[key], device=self.alpha.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
