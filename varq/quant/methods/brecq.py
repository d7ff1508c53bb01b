"""BRECQ as the Shift-and-Sum paper runs it (methods.md §5.1): Shift-and-Sum's quantizer framework (§3.2) without
shift-and-sum and without resampled calibration, with AdaRound block/layer reconstruction of the weights (§3.6).

Quantizers (bit-widths from ``bits``; "low" means below 6 bits):
* weights of every Linear (word_embed, mat_qkv, proj, fc1, fc2, every ada_lin, head_nm.ada_lin, head): static
  asymmetric min/max per output channel, or per channel and group of 128 inputs at low bits where in_features % 128
  == 0; then AdaRound;
* Linear inputs: dynamic per token (ada_lin's 2-D condition: per sample), per token and group of 64 at low bits
  where in_features % 128 == 0; fc2 inputs (post-GELU) with the sign-split quantizer;
* attention: Q per (b, h, token); K per (b, h, channel) over all cached keys, per (b, h, key) at low bits; the
  softmax output log2 per row; V per (b, h).
Kept FP: the VQ-VAE, embeddings, LayerNorm, softmax arithmetic, GELU, AdaLN modulation, residuals.

The hyper-parameter defaults are the released Shift-and-Sum command lines (§3.6: 5000 iterations, batch 4, Adam lr
1e-4 with cosine decay, λ = 1e-5, β 20 → 2 without warm-up, FP inputs and targets); BRECQ's original recipe (§5.1)
is ``lr_schedule=constant lr=1e-3 weight_reg=0.01 warmup=0.2 inputs=quant``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

from varq.quant.factories import (
    attention_operand_specs,
    dynamic_quantizer,
    static_weight_quantizer,
    token_spec,
    weight_spec,
)
from varq.quant.granularity import PerToken
from varq.quant.methods.base import Method
from varq.quant.model import QuantPolicy, load_quantizer_state_dict, quantize_var, quantizer_state_dict
from varq.quant.quantizer import QuantSpec
from varq.quant.recon import ReconConfig, reconstruct
from varq.quant.recon.config import ReconMethodConfig
from varq.quant.registry import register_method
from varq.quant.rounding import AdaRoundRounding

__all__ = ["BrecqConfig", "Brecq", "framework_policy", "released_weight_spec"]

log = logging.getLogger(__name__)


@dataclass
class BrecqConfig(ReconMethodConfig):
    name: str = "brecq"
    inputs: str = "fp"  # unit inputs: fp (released Shift-and-Sum framework) | quant (original BRECQ)
    # quantizer framework (methods.md §3.2)
    low_bits_below: int = 6  # "low" bit-widths (groups, per-key K) are those below this
    weight_group_size: int = 128  # at low weight bits, where in_features % weight_group_size == 0
    act_group_size: int = 64  # at low activation bits, where in_features % weight_group_size == 0
    exclude: list[str] = field(default_factory=list)  # Linear FQN globs kept FP
    # weight (Δ, z) as the released weight quantizer computes them: z clamped to [0, 2^b - 1], Δ ≥ 1e-6
    weight_zero_point_clamp: bool = True
    weight_min_step: float = 1e-6

    def __post_init__(self) -> None:
        self.recon_config()  # validates the reconstruction fields at start-up
        if self.weight_group_size < 0 or self.act_group_size < 0:
            raise ValueError("quant.weight_group_size and quant.act_group_size must be >= 0 (0 = no groups)")
        if not self.weight_min_step > 0:
            raise ValueError(f"quant.weight_min_step must be > 0, got {self.weight_min_step}")

    def recon_config(self) -> ReconConfig:  # type: ignore[override]
        return super().recon_config(self.inputs)


def released_weight_spec(spec: QuantSpec, clamp_zero_point: bool, min_step: float) -> QuantSpec:
    """``spec`` with the released weight quantizer's (Δ, z) rule: Δ floored at ``min_step`` and, when
    ``clamp_zero_point``, z clamped to [0, 2^b - 1] (a channel whose range excludes 0 then clips at its far end)."""
    return dataclasses.replace(spec, clamp_zero_point=clamp_zero_point, min_step=min_step)


def framework_policy(config: BrecqConfig, adaround: bool = False) -> QuantPolicy:
    """Shift-and-Sum's quantizer configuration (methods.md §3.2) without shift-and-sum.

    ``adaround=True`` gives the weight quantizers an (uninitialised) `AdaRoundRounding`, so a saved reconstruction
    loads into them; otherwise they round to nearest until `reconstruct` switches them.
    """
    G = config.weight_group_size

    def groupable(in_features: int) -> bool:
        return G > 0 and in_features % G == 0

    def linear_quantizers(site, linear, bits):
        w_low, a_low = bits.w_bits < config.low_bits_below, bits.a_bits < config.low_bits_below
        w_group = G if w_low and groupable(linear.in_features) else 0
        w_spec = released_weight_spec(
            weight_spec(bits.w_bits, linear.in_features, w_group), config.weight_zero_point_clamp,
            config.weight_min_step,
        )
        weight_q = static_weight_quantizer(linear, w_spec, rounding=AdaRoundRounding() if adaround else None)
        a_group = config.act_group_size if a_low and groupable(linear.in_features) else 0
        kind = "sign_split" if site.kind == "ffn_down" else "uniform"  # post-GELU input
        return weight_q, dynamic_quantizer(token_spec(bits.a_bits, linear.in_features, a_group, kind=kind))

    def attention_quantizers(block_idx, bits):
        specs = attention_operand_specs(bits.a_bits, softmax_kind="log2")
        if bits.a_bits < config.low_bits_below:
            specs["k_quantizer"] = QuantSpec(bits.a_bits, "uniform", PerToken())  # per (b, h, key) over channels
        return {name: dynamic_quantizer(spec) for name, spec in specs.items()}

    return QuantPolicy(
        linear_quantizers=linear_quantizers, attention_quantizers=attention_quantizers,
        exclude=tuple(config.exclude),
    )


@register_method("brecq", BrecqConfig)
class Brecq(Method):
    needs_calibration = True

    def __init__(self, config: BrecqConfig):
        super().__init__(config)
        self.stats: dict | None = None  # the last reconstruction's per-unit losses and timings

    def calibrate(self, var, calib_set, bits):
        if calib_set is None:
            raise ValueError("quant=brecq reconstructs on calibration data; it needs a calibration set")
        fp_var = copy.deepcopy(var)  # the FP targets; var itself becomes the quantized model
        qvar = quantize_var(var, framework_policy(self.config), bits)
        device = next(qvar.parameters()).device
        self.stats = reconstruct(qvar, fp_var, calib_set, self.config.recon_config(), device)
        log.info("brecq: %d units, %.1f s (fit %.1f s, capture %.1f s)", len(self.stats["units"]),
                 self.stats["total_s"], self.stats["fit_s"], self.stats["capture_s"])
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
            "recon_s_per_iter": self.stats["fit_s"] / iters if iters else None,
            "recon_loss_rtn": sum(u["loss_rtn"] for u in units), "recon_loss": sum(u["loss_after"] for u in units),
        }

    def quantizer_state(self, var):
        return quantizer_state_dict(var)  # ranges and the hardened AdaRound α of every weight

    def load_quantizer_state(self, var, state, bits):
        return load_quantizer_state_dict(quantize_var(var, framework_policy(self.config, adaround=True), bits), state)
