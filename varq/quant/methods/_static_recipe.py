"""Calibration with static quantizers and channel transforms folded into AdaLN: PTQ4ARVG and its SmoothQuant
baseline are two settings of one `Recipe` (the stages, statistics and options: `varq.quant.methods.ptq4arvg`).

`RecipeMethod` is the method base of both: ``calibrate`` runs the recipe, and the folded transforms are kept on the
method instance (``stages``), so its quantizer state carries them (`varq.quant.methods._folding`) and a load
replays them on the FP model.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import ClassVar

import torch
from torch import nn

from varq.models.adapter import LinearSite
from varq.models.lookup import adapter_for
from varq.quant.calib_pass import calib_batches, capture_inputs, observe_static_quantizers
from varq.quant.estimators import DEFAULT_QUANTILES
from varq.quant.factories import static_weight_quantizer
from varq.quant.granularity import PerChannel, PerScale, PerTensor
from varq.quant.methods._folding import Stage, apply_stage, split_state, stages_state
from varq.quant.methods.base import Method
from varq.quant.model import (
    QuantPolicy,
    dequantize_var,
    load_quantizer_state_dict,
    quantize_var,
    quantizer_state_dict,
    site_matches,
)
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.registration import MethodConfig
from varq.quant.transforms import (
    AdaLNSite,
    GPSStats,
    adaln_sites,
    gps_batch_scales,
    gps_scales,
    smoothquant_scales,
    symmetric_shift,
)

__all__ = [
    "Recipe", "RecipeMethod", "SinkTokenGroups", "StaticRecipeConfig", "build_quantized", "run_recipe", "save_state",
    "load_state",
]

STWQ_KINDS = ("qkv", "ffn_up")  # per-scale input ranges (the Linears fed by an AdaLN inside a block)
SINK_SPLIT_KINDS = ("attn_out", "ffn_down")  # a sink range and a rest range
STATISTICS = ("released", "fp")


@dataclass(frozen=True)
class Recipe:
    """What one calibration does; PTQ4ARVG and the SmoothQuant baseline are two settings of it."""

    smoothquant: bool
    shift: bool
    gps: bool
    stwq: bool
    sink_split: bool
    stats_skip_sink: bool  # qkv/fc1 transform statistics without the sink token
    quantize_attention: bool
    exclude: tuple[str, ...]  # Linear FQN globs kept FP
    alpha: float = 0.5
    batch_size: int = 64
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    ema_momentum: float = 0.1
    masked: bool = False
    statistics: str = "released"

    @property
    def released(self) -> bool:
        return self.statistics == "released"

    def static_spec(self, bits: int, granularity, weight: bool = False) -> QuantSpec:
        # weights are fitted once, so only activations carry the released EMA of (Δ, z)
        return QuantSpec(bits, "uniform", granularity, dynamic=False, estimator="percentile",
                         ema_momentum=self.ema_momentum, quantiles=self.quantiles,
                         ema_qparams=self.released and not weight)


@dataclass
class StaticRecipeConfig(MethodConfig):
    """The keys every recipe method has (PTQ4ARVG, SmoothQuant): migration strength, what stays FP, and how the
    static ranges are gathered."""

    alpha: float = 0.5  # SmoothQuant migration strength
    quantize_attention: bool = True  # static per-tensor Q, K, softmax output, V
    exclude: list[str] = field(default_factory=lambda: ["embed"])  # layer kinds or FQN globs kept FP
    batch_size: int = 64  # calibration rows per pass (the EMA runs over these batches)
    quantiles: list[float] = field(default_factory=lambda: list(DEFAULT_QUANTILES))
    ema_momentum: float = 0.1
    masked_calibration: bool = False  # False: unmasked calibration passes (released) | True: block-causal mask
    statistics: str = "released"  # released | fp (see varq.quant.methods.ptq4arvg)
    renamed: ClassVar[dict[str, str]] = {"keep_fp": "exclude"}

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"quant.alpha must be in [0, 1], got {self.alpha}")
        if self.batch_size < 1:
            raise ValueError(f"quant.batch_size must be >= 1, got {self.batch_size}")
        if self.statistics not in STATISTICS:
            raise ValueError(f"quant.statistics={self.statistics!r}; choose one of {', '.join(STATISTICS)}")

    def shared_recipe(self) -> dict:
        """The `Recipe` fields these keys set."""
        return dict(quantize_attention=self.quantize_attention, exclude=tuple(self.exclude), alpha=self.alpha,
                    batch_size=self.batch_size, quantiles=tuple(self.quantiles), ema_momentum=self.ema_momentum,
                    masked=self.masked_calibration, statistics=self.statistics)


class SinkTokenGroups:
    """The model's `TokenContext` seen through STWQ's two groups: 0 for the sink (scale 0), 1 for every other token.

    Set as a `QuantLinear.token_ctx`, so a `PerScale(2)` input quantizer picks the sink or the rest range both in the
    teacher-forced pass and at every KV-cached step.
    """

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    @property
    def scale_idx_L(self) -> torch.Tensor | None:
        idx_L = self.ctx.scale_idx_L
        return None if idx_L is None else (idx_L > 0).long()

    @property
    def num_cond(self) -> int | None:
        return self.ctx.num_cond


def _matches(fqn: str, patterns) -> bool:
    return any(fnmatchcase(fqn, p) for p in patterns)


def _sink_split(recipe: Recipe, site: LinearSite) -> bool:
    # the released ('fc2' or 'proj') condition is always true, but on VAR every Linear it reaches is a proj or fc2
    return recipe.sink_split and site.kind in SINK_SPLIT_KINDS


class SinkKeptFP(nn.Module):
    """Input quantizer of the shift/GPS stages on mat_qkv/fc1 (released): quantizes and observes every token but
    the first ``sink_tokens`` (the sink), which passes through FP."""

    def __init__(self, quantizer: FakeQuantizer, sink_tokens: int) -> None:
        super().__init__()
        self.quantizer, self.sink_tokens = quantizer, sink_tokens

    def forward(self, x_BLC: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
        sink_BlC, rest_BLC = x_BLC[:, : self.sink_tokens], x_BLC[:, self.sink_tokens :]
        return torch.cat((sink_BlC, self.quantizer(rest_BLC)), dim=1)


def _policy(recipe: Recipe, num_scales: int, channel_inputs: dict[str, AdaLNSite] | None = None,
            sink_tokens: int = 1) -> QuantPolicy:
    """The final quantizers; ``channel_inputs``: those sites get the per-channel input quantizers of the shift and
    GPS stages instead (sink kept FP where the site skips it)."""
    def linear_quantizers(site: LinearSite, linear: nn.Linear, bits):
        weight_q = static_weight_quantizer(linear, recipe.static_spec(bits.w_bits, PerChannel(0), weight=True))
        if channel_inputs is not None and site.fqn in channel_inputs:
            input_q = FakeQuantizer(recipe.static_spec(bits.a_bits, PerChannel(-1)))
            skips = recipe.stats_skip_sink and channel_inputs[site.fqn].skips_sink
            return weight_q, SinkKeptFP(input_q, sink_tokens) if skips else input_q
        if recipe.stwq and site.kind in STWQ_KINDS:
            granularity = PerScale(num_scales)
        elif _sink_split(recipe, site):
            granularity = PerScale(2)
        else:
            granularity = PerTensor()
        return weight_q, FakeQuantizer(recipe.static_spec(bits.a_bits, granularity))

    def attention_quantizers(block_idx: int, bits):
        spec = recipe.static_spec(bits.a_bits, PerTensor())
        return {name: FakeQuantizer(spec) for name in ("q_quantizer", "k_quantizer", "attn_quantizer", "v_quantizer")}

    return QuantPolicy(
        linear_quantizers=linear_quantizers,
        attention_quantizers=attention_quantizers if recipe.quantize_attention else None,
        exclude=recipe.exclude,
    )


def build_quantized(var: nn.Module, recipe: Recipe, bits, channel_inputs: dict[str, AdaLNSite] | None = None) -> nn.Module:
    """Swap in the final (uncalibrated) quantizers and bind the sink/rest token groups (``channel_inputs``: those
    sites get the per-channel input quantizers of the shift/GPS stages)."""
    adapter = adapter_for(var)
    quantize_var(var, _policy(recipe, adapter.num_scales, channel_inputs, adapter.sink_tokens), bits)
    for site in adapter.linears():
        m = var.get_submodule(site.fqn)
        if isinstance(m, QuantLinear) and _sink_split(recipe, site):
            m.token_ctx = SinkTokenGroups(adapter.token_ctx)
    return var


# -------------------------------------------------------------------- transform stages
def _sites(var: nn.Module, recipe: Recipe) -> dict[str, AdaLNSite]:
    linears = adapter_for(var).linear_sites()
    return {fqn: s for fqn, s in adaln_sites(var).items() if not site_matches(linears[fqn], recipe.exclude)}


def _applied(var: nn.Module, stage: Stage) -> Stage:
    apply_stage(var, stage)
    return stage


def _channel_inputs(var, sites, batches, recipe: Recipe, on_input) -> None:
    sink_tokens = adapter_for(var).sink_tokens

    def hook(fqn: str, x_BLC: torch.Tensor) -> None:
        if recipe.stats_skip_sink and sites[fqn].skips_sink:
            x_BLC = x_BLC[:, sink_tokens:]
        on_input(fqn, x_BLC.detach().float())

    capture_inputs(var, list(sites), batches, hook, masked=recipe.masked)


def _per_channel_input_quantizers(var, sites, batches, recipe: Recipe, bits: int) -> dict[str, FakeQuantizer]:
    device = next(var.parameters()).device
    quantizers = {fqn: FakeQuantizer(recipe.static_spec(bits, PerChannel(-1))).to(device) for fqn in sites}
    _channel_inputs(var, sites, batches, recipe, lambda fqn, x: quantizers[fqn].observe(x))
    for q in quantizers.values():
        q.freeze()
    return quantizers


@torch.no_grad()
def _smoothquant_stage(var, sites, batches, recipe: Recipe) -> Stage:
    absmax: dict[str, torch.Tensor] = {}

    def record(fqn: str, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=(0, 1))
        absmax[fqn] = m if fqn not in absmax else torch.maximum(absmax[fqn], m)

    _channel_inputs(var, sites, batches, recipe, record)
    return {fqn: (smoothquant_scales(absmax[fqn], var.get_submodule(fqn).weight, recipe.alpha), None) for fqn in sites}


@torch.no_grad()
def _shift_stage(var, sites, batches, recipe: Recipe, bits) -> Stage:
    pcq = _per_channel_input_quantizers(var, sites, batches, recipe, bits.a_bits)
    return {
        fqn: (torch.ones_like(q.range_min), symmetric_shift(q.range_min, q.range_max, bits.a_bits))
        for fqn, q in pcq.items()
    }


@torch.no_grad()
def _gps_stage(var, sites, batches, recipe: Recipe, bits) -> Stage:
    pcq = _per_channel_input_quantizers(var, sites, batches, recipe, bits.a_bits)
    ranges = {fqn: q.range_max - q.range_min for fqn, q in pcq.items()}
    outlier = {fqn: int(torch.argmax(r)) for fqn, r in ranges.items()}
    stats = {fqn: GPSStats.zeros(r.numel(), r.device) for fqn, r in ranges.items()}

    def record(fqn: str, x: torch.Tensor) -> None:
        o, q = outlier[fqn], pcq[fqn]
        stats[fqn].add(x, q.range_min[o], q.range_max[o], bits.a_bits)

    _channel_inputs(var, sites, batches, recipe, record)
    stage: Stage = {}
    for fqn in sites:
        weight = var.get_submodule(fqn).weight
        w_q = static_weight_quantizer(var.get_submodule(fqn), recipe.static_spec(bits.w_bits, PerChannel(0), True))
        s_C, _ = gps_scales(ranges[fqn], weight, w_q(weight), stats[fqn])
        stage[fqn] = (s_C, None)
    return stage


# -------------------------------------------------------------------- released statistics
def _ema(old: torch.Tensor | None, new: torch.Tensor, m: float) -> torch.Tensor:
    # the released EMA: the first batch initialises, every later one moves the value by m
    return new if old is None else (1 - m) * old + m * new


def _per_batch_inputs(var, sites, batch, recipe: Recipe) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    _channel_inputs(var, sites, [batch], recipe, lambda fqn, x: seen.__setitem__(fqn, x))
    return seen


@torch.no_grad()
def _smoothquant_stage_released(var, sites, batches, recipe: Recipe) -> Stage:
    scales: dict[str, torch.Tensor] = {}
    for batch in batches:
        for fqn, x in _per_batch_inputs(var, sites, batch, recipe).items():
            s_C = smoothquant_scales(x.abs().amax(dim=(0, 1)), var.get_submodule(fqn).weight, recipe.alpha)
            scales[fqn] = _ema(scales.get(fqn), s_C, recipe.ema_momentum)
    return {fqn: (scales[fqn], None) for fqn in sites}


def _channel_quantizers(var, sites) -> dict[str, FakeQuantizer]:
    out = {}
    for fqn in sites:
        q = var.get_submodule(fqn).input_quantizer
        out[fqn] = q.quantizer if isinstance(q, SinkKeptFP) else q
    return out


@torch.no_grad()
def _shift_and_gps_released(var, sites, batches, recipe: Recipe, bits) -> list[Stage]:
    """Shift, then GPS, with the statistics the released code gathers (module docstring)."""
    stages: list[Stage] = []
    build_quantized(var, recipe, bits, sites)
    observe_static_quantizers(var, batches, masked=recipe.masked, quantized=True)
    if recipe.shift:
        pcq = _channel_quantizers(var, sites)
        stage = {fqn: (torch.ones_like(q.range_min), symmetric_shift(q.range_min, q.range_max, bits.a_bits, True))
                 for fqn, q in pcq.items()}
        apply_stage(var, stage)
        stages.append(stage)
        # the shift changed the AdaLN weights: refit their weight quantizers; refit the per-channel inputs on the
        # shifted activations while every other quantizer keeps its state
        for site in {sites[fqn].ada_lin_fqn for fqn in sites}:
            qlin = var.get_submodule(site)
            if isinstance(qlin, QuantLinear):
                qlin.weight_quantizer = static_weight_quantizer(
                    qlin, recipe.static_spec(bits.w_bits, PerChannel(0), weight=True))
        for q in pcq.values():
            q.reset()
        observe_static_quantizers(var, batches, masked=recipe.masked, quantized=True)
    if recipe.gps:
        pcq = _channel_quantizers(var, sites)
        lo_hi = {fqn: (q.range_min.clone(), q.range_max.clone()) for fqn, q in pcq.items()}
        w_hat = {fqn: var.get_submodule(fqn).weight_quantizer(var.get_submodule(fqn).weight).detach().clone()
                 for fqn in sites}
        dequantize_var(var)  # GPS statistics come from the FP pass
        scales: dict[str, torch.Tensor] = {}
        for batch in batches:
            for fqn, x in _per_batch_inputs(var, sites, batch, recipe).items():
                s_C, _ = gps_batch_scales(x, var.get_submodule(fqn).weight, w_hat[fqn], *lo_hi[fqn], bits.a_bits)
                scales[fqn] = _ema(scales.get(fqn), s_C, recipe.ema_momentum)
        stage = {fqn: (scales[fqn], None) for fqn in sites}
        apply_stage(var, stage)
        stages.append(stage)
    else:
        dequantize_var(var)
    return stages


@torch.no_grad()
def run_recipe(var: nn.Module, calib_set, bits, recipe: Recipe) -> tuple[nn.Module, list[Stage]]:
    """Calibrate ``var`` in place: transform stages (folded), final quantizers, observation pass."""
    if calib_set is None or len(calib_set) == 0:
        raise ValueError("this method needs a calibration set (calib=dgc or calib=random)")
    device = next(var.parameters()).device
    batches = calib_batches(calib_set, recipe.batch_size, device)
    sites = _sites(var, recipe)
    stages: list[Stage] = []
    if recipe.released:
        steps = [(recipe.smoothquant, lambda: [_applied(var, _smoothquant_stage_released(var, sites, batches, recipe))]),
                 (recipe.shift or recipe.gps, lambda: _shift_and_gps_released(var, sites, batches, recipe, bits))]
    else:
        steps = [(recipe.smoothquant, lambda: [_applied(var, _smoothquant_stage(var, sites, batches, recipe))]),
                 (recipe.shift, lambda: [_applied(var, _shift_stage(var, sites, batches, recipe, bits))]),
                 (recipe.gps, lambda: [_applied(var, _gps_stage(var, sites, batches, recipe, bits))])]
    for wanted, make in steps:
        if wanted and sites:
            stages.extend(make())  # each stage is folded as soon as it is chosen
    build_quantized(var, recipe, bits)
    observe_static_quantizers(var, batches, masked=recipe.masked, quantized=recipe.released)
    return var, stages


# -------------------------------------------------------------------- state
def save_state(var: nn.Module, stages: list[Stage]) -> dict[str, torch.Tensor]:
    """The quantizers of ``var`` and the transform stages folded into it."""
    return {**quantizer_state_dict(var), **stages_state(stages)}


def load_state(var: nn.Module, state: dict[str, torch.Tensor], bits, recipe: Recipe) -> tuple[nn.Module, list[Stage]]:
    """Replay the saved folds on the FP ``var``, quantize it with ``recipe``'s quantizers and load their state."""
    device = next(var.parameters()).device
    stages, rest = split_state(state)
    stages = [{fqn: (s.to(device), None if d is None else d.to(device)) for fqn, (s, d) in stage.items()}
              for stage in stages]
    with torch.no_grad():
        for stage in stages:
            apply_stage(var, stage)
    build_quantized(var, recipe, bits)
    load_quantizer_state_dict(var, rest)
    return var, stages


class RecipeMethod(Method, ABC):
    """A method that calibrates with a `Recipe`; its state is the quantizers plus the folded transform stages."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.stages: list[Stage] = []  # the folds of the last calibrate / load, in order
        self._model: weakref.ref | None = None  # the model they were folded into

    @abstractmethod
    def recipe(self) -> Recipe:
        """What ``calibrate`` does, from the method's config."""

    def calibrate(self, var, calib_set, bits):
        var, self.stages = run_recipe(var, calib_set, bits, self.recipe())
        self._model = weakref.ref(var)
        return var

    def quantizer_state(self, var):
        # the folded weights differ from the checkpoint, so the state needs the stages; only this instance has them
        if self._model is None or self._model() is not var:
            raise ValueError(f"quant={self.name}: quantizer_state needs the method instance that calibrated or loaded "
                             "this model (the folded transforms are kept on it)")
        return save_state(var, self.stages)

    def load_quantizer_state(self, var, state, bits):
        var, self.stages = load_state(var, state, bits, self.recipe())
        self._model = weakref.ref(var)
        return var
