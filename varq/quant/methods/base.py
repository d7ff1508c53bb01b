"""What every method implements: calibrate an FP model into a fake-quantized one, and save/restore its state."""

from __future__ import annotations

from typing import Any

import torch

from varq.config import BitsConfig
from varq.quant.registry import MethodConfig


class Method:
    """Base class: ``calibrate(var, calib_set, bits)`` returns the fake-quantized VAR (same object, modified)."""

    name: str = ""
    needs_calibration: bool = True

    def __init__(self, config: MethodConfig):
        self.config = config

    def attach_sampler(self, vqvae: torch.nn.Module, eval_cfg: Any) -> None:
        """Hand over the VQ-VAE and the evaluation's sampling parameters before `calibrate`, for methods that
        generate with the model they are quantizing (Shift-and-Sum's free-running θ search); others ignore it."""

    def calibrate(self, var: torch.nn.Module, calib_set: Any | None, bits: BitsConfig) -> torch.nn.Module:
        raise NotImplementedError

    def quantizer_state(self, var: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the quantized model from the FP weights (scales, zero points, rounding)."""
        return {}

    def load_quantizer_state(self, var: torch.nn.Module, state: dict[str, torch.Tensor], bits: BitsConfig) -> torch.nn.Module:
        """Recreate the quantized model from ``quantizer_state`` without recalibrating."""
        return var
