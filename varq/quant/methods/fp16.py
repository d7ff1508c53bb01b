"""The unquantized reference: a no-op method, so the FP row comes out of the same pipeline as every other."""

from __future__ import annotations

from dataclasses import dataclass

from varq.quant.methods.base import Method
from varq.quant.registration import MethodConfig, register_method


@dataclass
class FP16Config(MethodConfig):
    name: str = "fp16"


@register_method("fp16", FP16Config)
class FP16(Method):
    needs_calibration = False
    has_state = False  # the FP model itself: nothing to save, nothing to restore

    def calibrate(self, var, calib_set, bits):
        return var
