"""PTQ4ARVG (methods.md §4): SmoothQuant init, symmetric shift, GPS and STWQ, training-free, static activations.

Pipeline (§4.4), every transform folded exactly into the preceding AdaLN (`varq.quant.transforms`):

1. SmoothQuant (α = 0.5, abs-max; qkv/fc1 statistics without the sink token) on mat_qkv, fc1 and head; fold.
2. Per-channel static input quantizers on the smoothed inputs → symmetric shift δ (bias-compensated); fold.
3. Per-channel input quantizers again, per-channel weight quantizers → GPS scales (§4.5); fold.
4. Final quantizers, all the shared `FakeQuantizer` with the percentile search and EMA (§4.2): weights per output
   channel; mat_qkv/fc1 inputs STWQ (one range per VAR scale, the sink token being scale 0); proj/fc2 inputs a
   sink range and a rest range; head and ada_lin inputs per tensor; Q, K, softmax output and V per tensor. word_embed
   stays FP.

The folded weights differ from the checkpoint, so the quantizer state also carries every stage's (s, δ) under
``transforms.<stage>.<fqn>.{scale_C,shift_C}``; loading replays the folds on the FP model, bit for bit.

Defaults reproduce the released code (docs/fidelity.md); today's alternatives are named options:

* ``masked_calibration: false`` — every calibration pass runs without the block-causal mask, as the release does
  (true: the masked pass, token for token the KV-cached pass the sampler runs).
* ``statistics: released`` — how the statistics are gathered: each static quantizer observes with the quantizers
  upstream of it switched on and keeps an EMA of its step and (fractional) zero point; the SmoothQuant and GPS
  scales are computed per calibration batch and averaged with the same EMA; the GPS outlier channel and its range
  come from each batch's min/max; the shift and GPS quantizers are per-channel on the smoothed inputs (the
  qkv/fc1 sink token left FP) inside a model whose other quantizers are already the final ones. ``statistics: fp``
  observes every quantizer on the FP model, keeps an EMA of ranges, takes SmoothQuant's running abs-max and
  evaluates GPS once on sums over all batches, with the percentile-searched per-channel ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from varq.models.adapter import LinearSite, adapter_for
from varq.quant.calib_pass import calib_batches, capture_inputs, observe_static_quantizers
from varq.quant.estimators import DEFAULT_QUANTILES
from varq.quant.factories import static_weight_quantizer
from varq.quant.granularity import PerChannel, PerScale, PerTensor
from varq.quant.methods.base import Method
from varq.quant.model import (
    QuantPolicy,
    dequantize_var,
    load_quantizer_state_dict,
    quantize_var,
    quantizer_state_dict,
)
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.registry import MethodConfig, register_method
from varq.quant.transforms import (
    AdaLNSite,
    GPSStats,
    adaln_sites,
    fold_channel_transform,
    gps_batch_scales,
    gps_scales,
    smoothquant_scales,
    symmetric_shift,
)

__all__ = [
    "PTQ4ARVGConfig", "PTQ4ARVG", "Recipe", "SinkTokenGroups",
    "build_quantized", "run_recipe", "save_state", "load_state",
]

STWQ_KINDS = ("qkv", "ffn_up")  # per-scale input ranges (the Linears fed by an AdaLN inside a block)
SINK_SPLIT_KINDS = ("attn_out", "ffn_down")  # a sink range and a rest range
TRANSFORM_PREFIX = "transforms."
STATISTICS = ("released", "fp")
# stage i of the folded transforms: {consumer fqn: (s_C, δ_C or None)}
Stage = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class PTQ4ARVGConfig(MethodConfig):
    name: str = "ptq4arvg"
    alpha: float = 0.5  # SmoothQuant migration strength
    smoothquant: bool = True
    shift: bool = True
    gps: bool = True
    stwq: bool = True  # per-scale mat_qkv/fc1 inputs (False: per tensor)
    sink_split: bool = True  # proj/fc2 inputs: sink token and the rest (False: per tensor)
    quantize_attention: bool = True  # static per-tensor Q, K, softmax output, V
    keep_fp: list[str] = field(default_factory=lambda: ["word_embed"])  # Linear FQN globs left FP
    batch_size: int = 64  # calibration rows per pass (the EMA runs over these batches)
    quantiles: list[float] = field(default_factory=lambda: list(DEFAULT_QUANTILES))
    ema_momentum: float = 0.1
    masked_calibration: bool = False  # False: unmasked calibration passes (released) | True: block-causal mask
    statistics: str = "released"  # released | fp (see the module docstring)

    def __post_init__(self) -> None:
        check_common(self)


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
    keep_fp: tuple[str, ...]
    alpha: float = 0.5
    batch_size: int = 64
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    ema_momentum: float = 0.1
    masked: bool = False
    statistics: str = "released"

    @classmethod
    def of(cls, c: PTQ4ARVGConfig) -> Recipe:
        return cls(
            smoothquant=c.smoothquant, shift=c.shift, gps=c.gps, stwq=c.stwq, sink_split=c.sink_split,
            stats_skip_sink=True, quantize_attention=c.quantize_attention, keep_fp=tuple(c.keep_fp), alpha=c.alpha,
            batch_size=c.batch_size, quantiles=tuple(c.quantiles), ema_momentum=c.ema_momentum,
            masked=c.masked_calibration, statistics=c.statistics,
        )

    @property
    def released(self) -> bool:
        return self.statistics == "released"

    def static_spec(self, bits: int, granularity, weight: bool = False) -> QuantSpec:
        # weights are fitted once, so only activations carry the released EMA of (Δ, z)
        return QuantSpec(bits, "uniform", granularity, dynamic=False, estimator="percentile",
                         ema_momentum=self.ema_momentum, quantiles=self.quantiles,
                         ema_qparams=self.released and not weight)


def check_common(c) -> None:
    """Validation shared by the PTQ4ARVG and SmoothQuant configs."""
    if not 0.0 <= c.alpha <= 1.0:
        raise ValueError(f"quant.alpha must be in [0, 1], got {c.alpha}")
    if c.batch_size < 1:
        raise ValueError(f"quant.batch_size must be >= 1, got {c.batch_size}")
    if c.statistics not in STATISTICS:
        raise ValueError(f"quant.statistics={c.statistics!r}; choose one of {', '.join(STATISTICS)}")


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
    the first ``first_l`` (the sink), which passes through FP."""

    def __init__(self, quantizer: FakeQuantizer, first_l: int) -> None:
        super().__init__()
        self.quantizer, self.first_l = quantizer, first_l

    def forward(self, x_BLC: torch.Tensor, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
        sink_BlC, rest_BLC = x_BLC[:, : self.first_l], x_BLC[:, self.first_l :]
        return torch.cat((sink_BlC, self.quantizer(rest_BLC)), dim=1)


def _policy(recipe: Recipe, num_scales: int, channel_inputs: dict[str, AdaLNSite] | None = None,
            first_l: int = 1) -> QuantPolicy:
    """The final quantizers; ``channel_inputs``: those sites get the per-channel input quantizers of the shift and
    GPS stages instead (sink kept FP where the site skips it)."""
    def linear_quantizers(site: LinearSite, linear: nn.Linear, bits):
        weight_q = static_weight_quantizer(linear, recipe.static_spec(bits.w_bits, PerChannel(0), weight=True))
        if channel_inputs is not None and site.fqn in channel_inputs:
            input_q = FakeQuantizer(recipe.static_spec(bits.a_bits, PerChannel(-1)))
            skips = recipe.stats_skip_sink and channel_inputs[site.fqn].skips_sink
            return weight_q, SinkKeptFP(input_q, first_l) if skips else input_q
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
        exclude=recipe.keep_fp,
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
    return {fqn: s for fqn, s in adaln_sites(var).items() if not _matches(fqn, recipe.keep_fp)}


def _apply_stage(var: nn.Module, stage: Stage) -> None:
    sites = adaln_sites(var)
    for fqn, (s_C, delta_C) in stage.items():
        fold_channel_transform(var, sites[fqn], s_C, delta_C)


def _applied(var: nn.Module, stage: Stage) -> Stage:
    _apply_stage(var, stage)
    return stage


def _channel_inputs(var, sites, batches, recipe: Recipe, on_input) -> None:
    first_l = adapter_for(var).sink_tokens

    def hook(fqn: str, x_BLC: torch.Tensor) -> None:
        if recipe.stats_skip_sink and sites[fqn].skips_sink:
            x_BLC = x_BLC[:, first_l:]
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
        _apply_stage(var, stage)
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
        _apply_stage(var, stage)
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
def stages_state(stages: list[Stage]) -> dict[str, torch.Tensor]:
    state = {}
    for i, stage in enumerate(stages):
        for fqn, (s_C, delta_C) in stage.items():
            state[f"{TRANSFORM_PREFIX}{i}.{fqn}.scale_C"] = s_C.detach().clone()
            if delta_C is not None:
                state[f"{TRANSFORM_PREFIX}{i}.{fqn}.shift_C"] = delta_C.detach().clone()
    return state


def split_state(state: dict[str, torch.Tensor]) -> tuple[list[Stage], dict[str, torch.Tensor]]:
    """(transform stages in fold order, the remaining quantizer state)."""
    raw: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    rest = {}
    for key, value in state.items():
        if not key.startswith(TRANSFORM_PREFIX):
            rest[key] = value
            continue
        stage_idx, _, tail = key[len(TRANSFORM_PREFIX):].partition(".")
        fqn, _, leaf = tail.rpartition(".")
        raw.setdefault(int(stage_idx), {}).setdefault(fqn, {})[leaf] = value
    stages = [
        {fqn: (t["scale_C"], t.get("shift_C")) for fqn, t in raw[i].items()} for i in sorted(raw)
    ]
    return stages, rest


def save_state(var: nn.Module) -> dict[str, torch.Tensor]:
    return {**quantizer_state_dict(var), **stages_state(getattr(var, "folded_transforms", []))}


def load_state(var: nn.Module, state: dict[str, torch.Tensor], bits, recipe: Recipe) -> nn.Module:
    device = next(var.parameters()).device
    stages, rest = split_state(state)
    with torch.no_grad():
        for stage in stages:
            _apply_stage(var, {
                fqn: (s.to(device), None if d is None else d.to(device)) for fqn, (s, d) in stage.items()
            })
    build_quantized(var, recipe, bits)
    load_quantizer_state_dict(var, rest)
    var.folded_transforms = stages
    return var


@register_method("ptq4arvg", PTQ4ARVGConfig)
class PTQ4ARVG(Method):
    def recipe(self) -> Recipe:
        return Recipe.of(self.config)

    def calibrate(self, var, calib_set, bits):
        var, stages = run_recipe(var, calib_set, bits, self.recipe())
        var.folded_transforms = stages  # the state needs them: folded weights differ from the checkpoint
        return var

    def quantizer_state(self, var):
        return save_state(var)

    def load_quantizer_state(self, var, state, bits):
        return load_state(var, state, bits, self.recipe())
