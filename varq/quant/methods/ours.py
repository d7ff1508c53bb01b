"""Shift-and-Sum ("ours", methods.md §3): shift-and-sum A·V under a BitOPs budget + AdaRound reconstruction.

Quantizers (§3.2): the framework's (`varq.quant.methods._framework`), all THE `FakeQuantizer`: below
``group_below_bits`` (W4/A4) weights per group of 128 inputs and activations per group of 64 channels where
in_features % 128 == 0 (word_embed stays per channel), per-key K; sign-split fc2 input; log2 softmax; weights
AdaRound-reconstructed; A·V with shift-and-sum rows (`ShiftSumAV`).

Pipeline (§3.7): quantize → θ₀ → AdaRound reconstruction with shift-and-sum on (`varq.quant.recon`, ``iters: 0``
skips it) → θ re-estimated on the final model. ``ours_litevar`` is this with fc2 FP.

θ comes from the mean attention recorded while the quantized model runs ``theta_source``:

* ``free_run`` (released): the quantized model *generates* the first calibration class (one CFG pair, top-k/top-p
  and guidance of the evaluation protocol, generator seeded ``theta_seed``), under fp16 autocast on CUDA. On the CPU
  it runs in fp32 (CPU fp16 autocast is not what the release ran either, and fp32 is the closer of the two).
  Needs the VQ-VAE to build each next input, which the pipeline hands over with `attach_sampler`.
* ``replay``: the quantized model is teacher-forced, scale by scale with the KV cache, on the first ``theta_rows``
  calibration sequences (no VQ-VAE needed).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from varq.models.lookup import adapter_for
from varq.quant.bitops import BitOps, choose_theta, extra_cost, model_bitops
from varq.quant.methods._framework import FrameworkConfig, framework_policy
from varq.quant.methods.base import PolicyMethod
from varq.quant.registration import register_method
from varq.quant.replay import forward_kv_cached
from varq.quant.shift_sum import install_shift_sum, record_importance, set_theta, shift_sum_modules

THETA_SOURCES = ("free_run", "replay")
BITOPS_FP_LAYERS = ("as_quantized", "fp16")


@dataclass
class OursConfig(FrameworkConfig):
    """The framework's keys (`FrameworkConfig`: exclude, groups, weight (Δ, z) rule, reconstruction) and θ's."""

    name: str = "ours"
    group_if_divisible_by: int = 128  # groups only where in_features % this == 0 (the released rule)
    # shift-and-sum and the θ search (§3.3, §3.4)
    shift_sum: bool = True
    max_order: int = 3
    alpha: float = 0.01  # extra BitOPs budget as a fraction of the model's BitOPs
    theta_grid: int = 10_000
    theta_rows: int = 1  # calibration classes (CFG pairs) run for the θ search (released: label #0 only)
    theta_source: str = "free_run"  # free_run (released: quantized generation) | replay (teacher-forced calib rows)
    theta_seed: int = 2025  # free_run's sampling generator (released: the run seed, 2025)
    reestimate_theta: bool = True  # θ again after reconstruction (§3.7 step 6)
    # A Linear left FP (ours_litevar's fc2) counts in the BitOPs total at the run's W/A bits (as_quantized: the
    # released compute_total_bitop uses the global w_bit·a_bit for every layer) or at 16 × 16 (fp16: the FP fc2 then
    # dominates the total, and the 1 % budget is 5.6× that of ours on VAR-d16 at W4A4, 2.9× at W6A6).
    bitops_fp_layers: str = "as_quantized"

    def __post_init__(self) -> None:
        if self.iters < 0 or self.theta_rows < 1 or self.theta_grid < 1:
            raise ValueError("quant.iters must be >= 0, quant.theta_rows and quant.theta_grid >= 1")
        if not 0 < self.alpha < 1:
            raise ValueError(f"quant.alpha must be in (0, 1), got {self.alpha}")
        if not 1 <= self.max_order <= 8:
            raise ValueError(f"quant.max_order must be in [1, 8], got {self.max_order}")
        for key, value, allowed in (
            ("theta_source", self.theta_source, THETA_SOURCES), ("bitops_fp_layers", self.bitops_fp_layers,
                                                                 BITOPS_FP_LAYERS),
        ):
            if value not in allowed:
                raise ValueError(f"quant.{key}={value!r}; choose one of {', '.join(allowed)}")
        super().__post_init__()


def _device(var) -> torch.device:
    return next(var.parameters()).device


@dataclass(frozen=True)
class ThetaSampler:
    """What a free-running θ search samples with: the VQ-VAE and the evaluation's guidance and filtering."""

    vqvae: Any
    cfg: float
    top_k: int
    top_p: float
    tau: float = 1.0  # bitwise (text-to-image) sampling temperature


def bitops_total(qvar, config: OursConfig, bits) -> BitOps:
    """The model's BitOPs per CFG pair under ``config.bitops_fp_layers`` (see `OursConfig`)."""
    fp_bits = (bits.w_bits, bits.a_bits) if config.bitops_fp_layers == "as_quantized" else None
    return model_bitops(qvar, fp_linear_bits=fp_bits)


@torch.no_grad()
def estimate_theta(qvar, calib_set, config: OursConfig, bits, sampler: ThetaSampler | None = None):
    """θ from the first ``theta_rows`` calibration classes run as CFG pairs by the quantized model
    (``theta_source``: generated from scratch, or teacher-forced on the calibration tokens)."""
    rows = list(range(min(config.theta_rows, len(calib_set))))
    with record_importance(qvar) as records:
        if config.theta_source == "free_run":
            if sampler is None:
                raise ValueError(
                    "quant.theta_source=free_run generates with the quantized model and needs the VQ-VAE: call "
                    "method.attach_sampler(vqvae, eval_cfg) before calibrate, or set quant.theta_source=replay"
                )
            calib_set.free_run(qvar, rows, sampler, config.theta_seed)
        else:
            label_2B, x_2BLC = calib_set.teacher_batch(rows, _device(qvar), with_uncond=True)
            forward_kv_cached(qvar, label_2B, x_2BLC, num_cond=len(rows))
    cost = extra_cost(records, adapter_for(qvar).head_dim, num_pairs=len(rows), max_order=config.max_order)
    return choose_theta(cost, bitops_total(qvar, config, bits).total, config.alpha, config.theta_grid)


def _reconstruct(qvar, fp_var, calib_set, config: OursConfig) -> dict:
    try:
        from varq.quant.recon import reconstruct
    except ImportError as err:
        raise RuntimeError(
            f"quant.iters={config.iters} needs AdaRound reconstruction (varq.quant.recon), which is not available "
            f"({err}); set quant.iters=0 to run shift-and-sum with round-to-nearest weights"
        ) from err
    return reconstruct(qvar, fp_var, calib_set, config.recon_config(), _device(qvar)) or {}


@register_method("ours", OursConfig)
class ShiftAndSum(PolicyMethod):
    needs_calibration = True

    def __init__(self, config: OursConfig):
        super().__init__(config)
        self._report: dict[str, Any] = {}
        self._sampler: ThetaSampler | None = None
        self._bits = None  # the W/A bits of the last calibrate / load (BitOPs of FP layers under as_quantized)

    def attach_sampler(self, vqvae, eval_cfg) -> None:
        """The VQ-VAE and sampling parameters a ``theta_source=free_run`` θ search generates with."""
        self._sampler = ThetaSampler(vqvae, float(eval_cfg.cfg), int(eval_cfg.top_k), float(eval_cfg.top_p),
                                     float(getattr(eval_cfg, "tau", 1.0)))

    def policy(self, bits):
        return framework_policy(self.config)

    def quantize(self, var, bits):
        self._bits = bits
        qvar = super().quantize(var, bits)
        if self.config.shift_sum:
            install_shift_sum(qvar, math.inf, self.config.max_order)
        return qvar

    def calibrate(self, var, calib_set, bits):
        config = self.config
        if calib_set is None or len(calib_set) == 0:
            raise ValueError("quant=ours needs a calibration set (calib=resample or calib=random)")
        if config.shift_sum and config.theta_source == "free_run" and self._sampler is None:
            raise ValueError(
                "quant.theta_source=free_run generates with the quantized model and needs the VQ-VAE: call "
                "method.attach_sampler(vqvae, eval_cfg) before calibrate, or set quant.theta_source=replay"
            )
        fp_var = copy.deepcopy(var) if config.iters > 0 else None  # untouched FP teacher for reconstruction
        qvar = self.quantize(var, bits)
        report: dict[str, Any] = {"alpha": config.alpha, "theta_source": config.theta_source}
        t0 = time.perf_counter()
        if config.shift_sum:
            choice = estimate_theta(qvar, calib_set, config, bits, self._sampler)
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
            choice = estimate_theta(qvar, calib_set, config, bits, self._sampler)
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
            fp_bits = self._bits if self.config.bitops_fp_layers == "as_quantized" else None
            fp_bits = None if fp_bits is None else (fp_bits.w_bits, fp_bits.a_bits)
            out["bitops_per_pair"] = model_bitops(var, fp_linear_bits=fp_bits).total
        return out


@dataclass
class OursLiteVARConfig(OursConfig):
    name: str = "ours_litevar"
    exclude: list[str] = field(default_factory=lambda: ["ffn_down"])  # LiteVAR's FP16 fc2


@register_method("ours_litevar", OursLiteVARConfig)
class ShiftAndSumLiteVAR(ShiftAndSum):
    """Ours with LiteVAR's FP fc2 (the published "Ours+LiteVAR" rows); everything else as ours."""
