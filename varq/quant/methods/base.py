"""What every method implements: calibrate an FP model into a fake-quantized one, and save/restore its state.

* `Method`: the contract. ``quantizer_state`` / ``load_quantizer_state`` raise unless the method declares it has no
  state (``has_state = False``, fp16), so a method that forgets them fails on save instead of sampling FP weights on
  resume.
* `PolicyMethod`: a method whose quantized model is `quantize_var` under one `QuantPolicy` (plus, for some, state
  learned on top of it, such as AdaRound roundings). It implements ``policy(bits)``; quantizing, saving and loading
  come from here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from varq.config import BitsConfig
from varq.quant.model import QuantPolicy, load_quantizer_state_dict, quantize_var, quantizer_state_dict
from varq.quant.quantizer import FakeQuantizer
from varq.quant.registration import MethodConfig
from varq.quant.rounding import AdaRoundRounding

ADAROUND_ALPHA = ".rounding.alpha"


class Method:
    """Base class: ``calibrate(var, calib_set, bits)`` returns the fake-quantized VAR (same object, modified)."""

    name: str = ""
    needs_calibration: bool = True
    has_state: bool = True  # False: the model is the FP one (nothing to save or restore)

    def __init__(self, config: MethodConfig):
        self.config = config

    def attach_sampler(self, vqvae: torch.nn.Module, eval_cfg: Any) -> None:
        """Hand over the VQ-VAE and the evaluation's sampling parameters before `calibrate`, for methods that
        generate with the model they are quantizing (Shift-and-Sum's free-running θ search); others ignore it."""

    def calibrate(self, var: torch.nn.Module, calib_set: Any | None, bits: BitsConfig) -> torch.nn.Module:
        raise NotImplementedError(f"method '{self.name}' does not implement calibrate")

    def quantizer_state(self, var: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the quantized model from the FP weights (scales, zero points, rounding)."""
        if not self.has_state:
            return {}
        raise NotImplementedError(f"method '{self.name}' does not implement quantizer_state")

    def load_quantizer_state(self, var: torch.nn.Module, state: dict[str, torch.Tensor], bits: BitsConfig) -> torch.nn.Module:
        """Recreate the quantized model from ``quantizer_state`` without recalibrating."""
        if not self.has_state:
            return var
        raise NotImplementedError(f"method '{self.name}' does not implement load_quantizer_state")

    def report(self, var: torch.nn.Module | None = None) -> dict[str, Any]:
        """Scalars for the result row (as quant_*); none by default."""
        return {}


def install_adaround_for(var: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every weight quantizer whose AdaRound α ``state`` holds an AdaRound rounding, so the state loads strictly
    (α's shape is adopted on load); the other quantizers keep rounding to nearest."""
    for key in state:
        if key.endswith(ADAROUND_ALPHA):
            quantizer = var.get_submodule(key[: -len(ADAROUND_ALPHA)])
            if isinstance(quantizer, FakeQuantizer) and not isinstance(quantizer.rounding, AdaRoundRounding):
                quantizer.rounding = AdaRoundRounding().to(quantizer.frozen.device)
                quantizer.invalidate_cache()


class PolicyMethod(Method, ABC):
    """A method defined by its `QuantPolicy`: quantize with it, save every quantizer, and load by quantizing again
    (with AdaRound roundings where the state holds α) then loading strictly."""

    needs_calibration = False  # the plain policy methods fit weights to the weights and keep activations dynamic

    @abstractmethod
    def policy(self, bits: BitsConfig) -> QuantPolicy:
        """The quantizers of every Linear and attention operand at ``bits``."""

    def quantize(self, var: torch.nn.Module, bits: BitsConfig) -> torch.nn.Module:
        """``var`` fake-quantized with the policy (the starting point of calibration and of loading a state)."""
        return quantize_var(var, self.policy(bits), bits)

    def calibrate(self, var, calib_set, bits):
        return self.quantize(var, bits)

    def quantizer_state(self, var):
        return quantizer_state_dict(var)  # ranges and, after reconstruction, the hardened AdaRound α of every weight

    def load_quantizer_state(self, var, state, bits):
        qvar = self.quantize(var, bits)
        install_adaround_for(qvar, state)
        return load_quantizer_state_dict(qvar, state)
