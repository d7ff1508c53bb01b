"""BRECQ as the Shift-and-Sum paper runs it (methods.md §5.1): Shift-and-Sum's quantizer framework (§3.2) without
shift-and-sum and without resampled calibration, with AdaRound block/layer reconstruction of the weights (§3.6).

Quantizers: the framework's (`varq.quant.methods._framework`) on every Linear (word_embed, mat_qkv, proj, fc1, fc2,
every ada_lin, head_nm.ada_lin, head) and attention operand, weights then AdaRound-reconstructed. Grouping follows
the weight group size (in_features % ``weight_group_size`` == 0) unless ``group_if_divisible_by`` is set.
Kept FP: the VQ-VAE, embeddings, LayerNorm, softmax arithmetic, GELU, AdaLN modulation, residuals.

The hyper-parameter defaults are the released Shift-and-Sum command lines (§3.6: 5000 iterations, batch 4, Adam lr
1e-4 with cosine decay, λ = 1e-5, β 20 → 2 without warm-up, FP inputs and targets); BRECQ's original recipe (§5.1)
is ``lr_schedule=constant lr=1e-3 weight_reg=0.01 warmup=0.2 recon_inputs=quant``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

from varq.quant.methods._framework import FrameworkConfig, framework_policy
from varq.quant.methods.base import PolicyMethod
from varq.quant.recon import reconstruct
from varq.quant.registration import register_method

__all__ = ["BrecqConfig", "Brecq", "framework_policy"]

log = logging.getLogger(__name__)


@dataclass
class BrecqConfig(FrameworkConfig):
    name: str = "brecq"
    renamed: ClassVar[dict[str, str]] = {"low_bits_below": "group_below_bits", "inputs": "recon_inputs"}


@register_method("brecq", BrecqConfig)
class Brecq(PolicyMethod):
    needs_calibration = True

    def __init__(self, config: BrecqConfig):
        super().__init__(config)
        self.stats: dict | None = None  # the last reconstruction's per-unit losses and timings

    def policy(self, bits):
        return framework_policy(self.config)

    def calibrate(self, var, calib_set, bits):
        if calib_set is None:
            raise ValueError("quant=brecq reconstructs on calibration data; it needs a calibration set")
        fp_var = copy.deepcopy(var)  # the FP targets; var itself becomes the quantized model
        qvar = self.quantize(var, bits)
        device = next(qvar.parameters()).device
        self.stats = reconstruct(qvar, fp_var, calib_set, self.config.recon_config(), device)
        log.info("brecq: %d units, %.1f s (fit %.1f s, capture %.1f s, scoring %.1f s)", len(self.stats["units"]),
                 self.stats["total_s"], self.stats["fit_s"], self.stats["capture_s"], self.stats["score_s"])
        return qvar

    def report(self, var=None) -> dict:
        """Scalars for the result row (as quant_*): reconstruction cost and the summed unit losses (RTN → AdaRound).

        Empty after `load_quantizer_state`: the statistics belong to the calibration run, not to the saved state.
        """
        if self.stats is None:
            return {}
        units = self.stats["units"]
        iters = sum(u["iters"] for u in units)
        return {
            "recon_units": len(units), "recon_rows": self.stats["rows"], "recon_total_s": self.stats["total_s"],
            "recon_fit_s": self.stats["fit_s"], "recon_capture_s": self.stats["capture_s"],
            "recon_score_s": self.stats["score_s"],
            "recon_s_per_iter": self.stats["fit_s"] / iters if iters else None,
            "recon_loss_rtn": sum(u["loss_rtn"] for u in units), "recon_loss": sum(u["loss_after"] for u in units),
        }
