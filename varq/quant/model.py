"""Quantizing a model: which layers a method quantizes, how, and how the result is saved and restored.

Which Linears and attention modules exist, and what kind each is, comes from the model's adapter
(`varq.models.adapter`); nothing here names a layer. A method describes itself with a `QuantPolicy` (which Linear
FQNs, quantizer factories for Linears and attention operands) and calls `quantize_var`; the FP weights stay the
model's own Parameters (`QuantLinear` holds them under the same keys), so an FP checkpoint loads strictly into the
model *before* quantization and the quantizer state saved afterwards is only the quantizers' buffers and
parameters, keyed by FQN.

`quant_enabled` switches weight and/or activation quantization of any module group on and off (BRECQ and
Shift-and-Sum's reconstruction, FP targets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from varq.config import BitsConfig
from varq.models.adapter import LinearSite
from varq.models.lookup import adapter_for
from varq.quant.attention import OPERANDS, AttentionOperandQuant
from varq.quant.granularity import PerScale
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer
from varq.quant.swap import swap_linears, unswap_linears

__all__ = [
    "LinearQuantizers",
    "AttentionQuantizers",
    "QuantPolicy",
    "quantizable_linears",
    "site_matches",
    "quantize_var",
    "dequantize_var",
    "quant_linears",
    "attention_quants",
    "quantizer_state_dict",
    "load_quantizer_state_dict",
    "quant_enabled",
]

# (site, linear, bits) -> (weight quantizer, input quantizer); None keeps that side FP. The site gives the FQN and
# the kind of layer (`varq.models.adapter.LINEAR_KINDS`).
LinearQuantizers = Callable[[LinearSite, nn.Linear, BitsConfig], tuple[FakeQuantizer | None, FakeQuantizer | None]]
# (block index, bits) -> {"q_quantizer" | "k_quantizer" | "attn_quantizer" | "v_quantizer": quantizer or None}
AttentionQuantizers = Callable[[int, BitsConfig], dict[str, nn.Module | None]]


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(fqn, p) for p in patterns)


def site_matches(site: LinearSite, patterns: Sequence[str]) -> bool:
    """Whether a Linear is named by ``patterns``: each entry is a layer kind (``ffn_down``, ``embed`` …, see
    `varq.models.adapter.LINEAR_KINDS`; the same in every model family) or an FQN glob (``blocks.*.ffn.fc2``)."""
    return any(p == site.kind or fnmatchcase(site.fqn, p) for p in patterns)


@dataclass
class QuantPolicy:
    """What a method quantizes and with which quantizers.

    Args:
        linear_quantizers: factory called once per selected Linear (weights are already on their device, so a
            static weight quantizer may observe the weight right there).
        attention_quantizers: factory called once per block; None leaves attention FP (fused SDPA).
        include: layer kinds or FQN globs of the Linears to quantize (`site_matches`); None: every quantizable
            Linear (`quantizable_linears`).
        exclude: layer kinds or FQN globs kept FP even if included (LiteVAR: ``ffn_down``, from its config).
        skip_single_key: see `AttentionOperandQuant` (LiteVAR).
    """

    linear_quantizers: LinearQuantizers
    attention_quantizers: AttentionQuantizers | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    skip_single_key: bool = False

    def selects(self, site: LinearSite) -> bool:
        included = self.include is None or site_matches(site, self.include)
        return included and not site_matches(site, self.exclude)


def quantizable_linears(var: nn.Module) -> list[str]:
    """FQNs of every Linear a method may quantize, in module-registration order (QuantLinears included)."""
    return [site.fqn for site in adapter_for(var).linears()]


def _model_device(var: nn.Module) -> torch.device:
    return next(var.parameters()).device


def quantize_var(var: nn.Module, policy: QuantPolicy, bits: BitsConfig) -> nn.Module:
    """Fake-quantize ``var`` in place according to ``policy``; returns the same object.

    Load FP checkpoints before calling this (parameter keys are unchanged, but new quantizer keys appear).
    """
    adapter = adapter_for(var)
    device = _model_device(var)
    all_sites = adapter.linears()
    for key, patterns in (("include", policy.include or ()), ("exclude", policy.exclude)):
        # a typo would silently quantize (or keep FP) other layers than the row says
        unmatched = [p for p in patterns if not any(site_matches(s, [p]) for s in all_sites)]
        if unmatched:
            kinds = sorted({s.kind for s in all_sites})
            raise ValueError(
                f"quant.{key}: {unmatched} name no Linear of this model; use layer kinds ({', '.join(kinds)}) "
                f"or FQN globs such as {all_sites[-1].fqn!r}"
            )
    sites = {site.fqn: site for site in all_sites if policy.selects(site)}

    def make(fqn: str, linear: nn.Linear):
        weight_q, input_q = policy.linear_quantizers(sites[fqn], linear, bits)
        return tuple(None if q is None else q.to(device) for q in (weight_q, input_q))

    swap_linears(var, include=list(sites), make_quantizers=make)
    for fqn, site in sites.items():
        qlinear = var.get_submodule(fqn)
        iq = qlinear.input_quantizer
        if isinstance(iq, FakeQuantizer) and isinstance(iq.spec.granularity, PerScale):
            # A per-scale (STWQ) input quantizer needs the scale of every token, but the model calls `linear(x)`;
            # the model's TokenContext knows it for the Linears whose input tokens are the model's token sequence.
            if not site.token_aligned:
                raise ValueError(
                    f"{fqn}: a PerScale input quantizer needs one scale per input token, which a {site.kind} "
                    f"Linear does not have (its input skips tokens or has no token dim)"
                )
            qlinear.token_ctx = adapter.token_ctx
    if policy.attention_quantizers is not None:
        for i, attn in adapter.attention_modules().items():
            quantizers = policy.attention_quantizers(i, bits)
            unknown = set(quantizers) - set(OPERANDS)
            if unknown:
                raise ValueError(f"unknown attention operands {sorted(unknown)}; expected a subset of {OPERANDS}")
            attn.operand_quant = AttentionOperandQuant(
                **{k: None if q is None else q.to(device) for k, q in quantizers.items()},
                token_ctx=adapter.token_ctx, scale_bounds=adapter.scale_bounds, block_idx=i,
                skip_single_key=policy.skip_single_key,
                # model.attn_query_chunk (set when the model is built from its config): bounded attention memory
                query_chunk=getattr(var, "attn_query_chunk", None),
            )
    return var


def dequantize_var(var: nn.Module) -> nn.Module:
    """Undo `quantize_var`: plain Linears with the same Parameters and fused FP attention."""
    unswap_linears(var)
    for attn in adapter_for(var).attention_modules().values():
        attn.operand_quant = None
    return var


# -------------------------------------------------------------------- module groups
def quant_linears(module: nn.Module, prefix: str = "") -> dict[str, QuantLinear]:
    """Every QuantLinear under ``module`` by FQN (prefixed with ``prefix``)."""
    return {
        f"{prefix}{fqn}": m for fqn, m in module.named_modules() if isinstance(m, QuantLinear)
    }


def attention_quants(var: nn.Module) -> dict[int, AttentionOperandQuant]:
    """Installed attention operand quantizers by block index."""
    return {
        i: attn.operand_quant for i, attn in adapter_for(var).attention_modules().items()
        if isinstance(attn.operand_quant, AttentionOperandQuant)
    }


def _quantizers_of(modules: Sequence[nn.Module], weights: bool, activations: bool) -> Iterator[nn.Module]:
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            found = []
            if isinstance(m, QuantLinear):
                if weights:
                    found.append(m.weight_quantizer)
                if activations:
                    found.append(m.input_quantizer)
            elif isinstance(m, AttentionOperandQuant) and activations:
                found.extend(m.operand_quantizers().values())
            for q in found:
                if q is not None and id(q) not in seen:
                    seen.add(id(q))
                    yield q


@contextlib.contextmanager
def quant_enabled(
    modules: nn.Module | Sequence[nn.Module], *, weights: bool | None = None, activations: bool | None = None,
):
    """Temporarily switch weight and/or activation quantizers of ``modules`` (a model, a block, a list) on or off.

    None leaves that side as it is. ``quant_enabled(var, weights=False, activations=False)`` runs the FP model
    (attention still takes the explicit path, equal to SDPA up to rounding); BRECQ caches FP targets this way.
    Previous flags are restored on exit, also after an exception.
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    saved: list[tuple[nn.Module, bool]] = []
    try:
        for side, value in (("weights", weights), ("activations", activations)):
            if value is None:
                continue
            for q in _quantizers_of(roots, weights=side == "weights", activations=side == "activations"):
                saved.append((q, q.enabled))
                q.enabled = value
        yield
    finally:
        for q, flag in reversed(saved):
            q.enabled = flag


# -------------------------------------------------------------------- state
def _quantizer_roots(var: nn.Module) -> list[str]:
    # Top-level quantizer modules: their whole subtree (ranges, AdaRound α, an av_matmul's θ …) is quantizer state.
    roots = []
    for fqn, m in var.named_modules():
        if isinstance(m, (FakeQuantizer, AttentionOperandQuant)) and not any(fqn.startswith(r + ".") for r in roots):
            roots.append(fqn)
    return roots


def quantizer_state_dict(var: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers and parameters of every quantizer by FQN; the FP weights are not included."""
    state: dict[str, torch.Tensor] = {}
    for fqn in _quantizer_roots(var):
        for key, value in var.get_submodule(fqn).state_dict(prefix=f"{fqn}.").items():
            state[key] = value.detach().clone()
    return state


def load_quantizer_state_dict(var: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load `quantizer_state_dict` output into a model quantized with the same policy (strict on quantizer keys)."""
    roots = _quantizer_roots(var)
    expected = {k for fqn in roots for k in var.get_submodule(fqn).state_dict(prefix=f"{fqn}.")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(
            f"quantizer state does not fit this model (was it quantized with the same method and bits?): "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    for fqn in roots:
        sub = {k[len(fqn) + 1 :]: v for k, v in state.items() if k.startswith(f"{fqn}.")}
        var.get_submodule(fqn).load_state_dict(sub, strict=True)
    return var
