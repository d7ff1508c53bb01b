"""Shift-and-Sum ("ours", methods.md §3): shift-and-sum A·V under a BitOPs budget + AdaRound reconstruction.

Quantizers (§3.2), all THE `FakeQuantizer`:

* Linear weights: static asymmetric min/max per output channel; below ``group_below_bits`` (W4) per channel and group
  of ``weight_group_size`` (128) inputs where in_features % 128 == 0 (word_embed stays per channel); AdaRound.
* Linear inputs: dynamic per token (2-D ada_lin inputs: per sample); below A6 per token and group of
  ``act_group_size`` (64) channels where in_features % 128 == 0. The fc2 input (post-GELU) is sign-split.
* Attention: Q per (b, h, token); K per (b, h, channel) over every cached key, below A6 per (b, h, key token);
  softmax output log2 per row; V per (b, h) over every cached key, with shift-and-sum rows (`ShiftSumAV`).

Pipeline (§3.7): quantize → θ₀ from a replay of calibration row(s) → AdaRound reconstruction with shift-and-sum on
(`varq.quant.recon`, ``iters: 0`` skips it) → θ re-estimated on the final model. ``ours_litevar`` is this with fc2 FP.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from varq.quant.bitops import choose_theta, extra_cost, model_bitops
from varq.quant.factories import dynamic_quantizer, static_weight_quantizer, token_spec, weight_spec
from varq.quant.granularity import PerAxes, PerToken
from varq.quant.methods.base import Method
from varq.quant.model import QuantPolicy, load_quantizer_state_dict, quantize_var, quantizer_state_dict
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.recon.config import ReconMethodConfig
from varq.quant.registry import register_method
from varq.quant.replay import forward_kv_cached
from varq.quant.rounding import AdaRoundRounding
from varq.quant.shift_sum import install_shift_sum, record_importance, set_theta, shift_sum_modules


@dataclass
class OursConfig(ReconMethodConfig):
    name: str = "ours"
    exclude: list[str] = field(default_factory=list)  # Linear FQN globs kept FP (ours_litevar: blocks.*.ffn.fc2)
    # quantizer layout (§3.2)
    group_below_bits: int = 6  # groups are used for bit-widths below this (W4/A4)
    weight_group_size: int = 128
    act_group_size: int = 64
    group_if_divisible_by: int = 128  # groups only where in_features % this == 0 (the released rule)
    # shift-and-sum and the θ search (§3.3, §3.4)
    shift_sum: bool = True
    max_order: int = 3
    alpha: float = 0.01  # extra BitOPs budget as a fraction of the model's BitOPs
    theta_grid: int = 10_000
    theta_rows: int = 1  # calibration sequences (CFG pairs) replayed for the θ search (released: label #0)
    reestimate_theta: bool = True  # θ again after reconstruction (§3.7 step 6)
    # AdaRound reconstruction (§3.6): the shared fields come from ReconMethodConfig
    recon_inputs: str = "fp"  # unit inputs recorded from the FP model, like the targets (released code)

    def __post_init__(self) -> None:
        if self.iters < 0 or self.theta_rows < 1 or self.theta_grid < 1:
            raise ValueError("quant.iters must be >= 0, quant.theta_rows and quant.theta_grid >= 1")
        if not 0 < self.alpha < 1:
            raise ValueError(f"quant.alpha must be in (0, 1), got {self.alpha}")
        if not 1 <= self.max_order <= 8:
            raise ValueError(f"quant.max_order must be in [1, 8], got {self.max_order}")


def _group(bits: int, features: int, group_size: int, config: OursConfig) -> int:
    grouped = bits < config.group_below_bits and features % config.group_if_divisible_by == 0
    return group_size if grouped else 0


def ours_policy(config: OursConfig) -> QuantPolicy:
    def linear_quantizers(fqn, linear, bits):
        w_group = _group(bits.w_bits, linear.in_features, config.weight_group_size, config)
        weight_q = static_weight_quantizer(linear, weight_spec(bits.w_bits, linear.in_features, w_group))
        a_group = _group(bits.a_bits, linear.in_features, config.act_group_size, config)
        kind = "sign_split" if fqn.endswith("ffn.fc2") else "uniform"
        return weight_q, dynamic_quantizer(token_spec(bits.a_bits, linear.in_features, a_group, kind=kind))

    def attention_quantizers(block_idx, bits):
        b = bits.a_bits
        k_granularity = PerToken() if b < config.group_below_bits else PerAxes((0, 1, 3))
        return {
            "q_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerToken())),
            "k_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", k_granularity)),
            "attn_quantizer": dynamic_quantizer(QuantSpec(b, "log2", PerToken())),
            "v_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerAxes((0, 1)))),
        }

    return QuantPolicy(linear_quantizers, attention_quantizers, exclude=tuple(config.exclude))


def _device(var) -> torch.device:
    return next(var.parameters()).device


@torch.no_grad()
def estimate_theta(qvar, calib_set, config: OursConfig):
    """θ from replaying the first ``theta_rows`` calibration sequences as CFG pairs with the quantized model."""
    rows = list(range(min(config.theta_rows, len(calib_set))))
    label_2B, x_2BLC = calib_set.teacher_batch(rows, _device(qvar), with_uncond=True)
    with record_importance(qvar) as records:
        forward_kv_cached(qvar, label_2B, x_2BLC, num_cond=len(rows))
    cost = extra_cost(records, qvar.blocks[0].attn.head_dim, num_pairs=len(rows), max_order=config.max_order)
    return choose_theta(cost, model_bitops(qvar).total, config.alpha, config.theta_grid)


def _reconstruct(qvar, fp_var, calib_set, config: OursConfig) -> dict:
    try:
        from varq.quant.recon import reconstruct
    except ImportError as err:
        raise RuntimeError(
            f"quant.iters={config.iters} needs AdaRound reconstruction (varq.quant.recon), which is not available "
            f"({err}); set quant.iters=0 to run shift-and-sum with round-to-nearest weights"
        ) from err
    return reconstruct(qvar, fp_var, calib_set, config.recon_config(config.recon_inputs), _device(qvar)) or {}


def _install_adaround_for(var, state: dict[str, torch.Tensor]) -> None:
    # The saved state holds AdaRound α for reconstructed weights; give those quantizers an AdaRound rounding so the
    # state loads strictly (α's shape is adopted on load).
    for key in state:
        if key.endswith(".rounding.alpha"):
            quantizer = var.get_submodule(key[: -len(".rounding.alpha")])
            if isinstance(quantizer, FakeQuantizer) and not isinstance(quantizer.rounding, AdaRoundRounding):
                quantizer.rounding = AdaRoundRounding().to(quantizer.frozen.device)
                quantizer.invalidate_cache()


@register_method("ours", OursConfig)
class ShiftAndSum(Method):
    needs_calibration = True

    def __init__(self, config: OursConfig):
        super().__init__(config)
        self._report: dict[str, Any] = {}

    def _quantize(self, var, bits):
        qvar = quantize_var(var, ours_policy(self.config), bits)
        if self.config.shift_sum:
            install_shift_sum(qvar, math.inf, self.config.max_order)
        return qvar

    def calibrate(self, var, calib_set, bits):
        config = self.config
        if calib_set is None or len(calib_set) == 0:
            raise ValueError("quant=ours needs a calibration set (calib=resample or calib=random)")
        fp_var = copy.deepcopy(var) if config.iters > 0 else None  # untouched FP teacher for reconstruction
        qvar = self._quantize(var, bits)
        report: dict[str, Any] = {"alpha": config.alpha}
        t0 = time.perf_counter()
        if config.shift_sum:
            choice = estimate_theta(qvar, calib_set, config)
            set_theta(qvar, choice.theta, choice.extra_frac)
            report.update(theta_init=choice.theta, extra_bitops_frac_init=choice.extra_frac)
        report["time_theta_s"] = time.perf_counter() - t0
        if config.iters > 0:
            t0 = time.perf_counter()
            stats = _reconstruct(qvar, fp_var, calib_set, config)
            report["time_recon_s"] = time.perf_counter() - t0
            report.update({f"recon_{k}": v for k, v in stats.items() if isinstance(v, (int, float, str, bool))})
            del fp_var
        if config.shift_sum and config.reestimate_theta:
            t0 = time.perf_counter()
            choice = estimate_theta(qvar, calib_set, config)
            set_theta(qvar, choice.theta, choice.extra_frac)
            report["time_theta_s"] += time.perf_counter() - t0
        if config.shift_sum:
            report.update(
                theta=choice.theta, extra_bitops_frac=choice.extra_frac, budget_binding=choice.budget_binding,
                bitops_per_pair=choice.total_bitops,
            )
        self._report = report
        return qvar

    def report(self, var=None) -> dict[str, Any]:
        """Fields for the result row: θ, the extra BitOPs fraction it spends, timings (see the module docstring)."""
        out = dict(self._report)
        modules = shift_sum_modules(var) if var is not None else []
        if modules:  # the state is the source of truth (also after load_quantizer_state)
            out["theta"] = float(modules[0].theta)
            out["extra_bitops_frac"] = float(modules[0].extra_bitops_frac)
            out["bitops_per_pair"] = model_bitops(var).total
        return out

    def quantizer_state(self, var):
        return quantizer_state_dict(var)

    def load_quantizer_state(self, var, state, bits):
        qvar = self._quantize(var, bits)
        _install_adaround_for(qvar, state)
        return load_quantizer_state_dict(qvar, state)


@dataclass
class OursLiteVARConfig(OursConfig):
    name: str = "ours_litevar"
    exclude: list[str] = field(default_factory=lambda: ["blocks.*.ffn.fc2"])  # LiteVAR's FP16 fc2


@register_method("ours_litevar", OursLiteVARConfig)
class ShiftAndSumLiteVAR(ShiftAndSum):
    """Ours with LiteVAR's FP fc2 (the published "Ours+LiteVAR" rows); everything else as ours."""
