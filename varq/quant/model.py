"""The VAR adapter: which layers a method quantizes, how, and how the result is saved and restored.

A method describes itself with a `QuantPolicy` (which Linear FQNs, quantizer factories for Linears and attention
operands) and calls `quantize_var`; the FP weights stay the model's own Parameters (`QuantLinear` holds them under
the same keys), so an FP checkpoint loads strictly into the model *before* quantization and the quantizer state
saved afterwards is only the quantizers' buffers and parameters, keyed by FQN.

For block-wise reconstruction (BRECQ, Shift-and-Sum) `block_quant_modules` lists one block's quantized modules and
`quant_enabled` switches weight and/or activation quantization of any module group on and off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from varq.config import BitsConfig
from varq.quant.attention import OPERANDS, AttentionOperandQuant
from varq.quant.granularity import PerScale
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer
from varq.quant.swap import swap_linears, unswap_linears

__all__ = [
    "QUANTIZABLE_PATTERNS",
    "LinearQuantizers",
    "AttentionQuantizers",
    "QuantPolicy",
    "BlockQuantModules",
    "quantizable_linears",
    "quantize_var",
    "dequantize_var",
    "quant_linears",
    "attention_quants",
    "block_quant_modules",
    "quantizer_state_dict",
    "load_quantizer_state_dict",
    "quant_enabled",
]

# Every nn.Linear of VAR (methods.md §3.2); `ada_lin.0` is a SiLU, `ada_lin.1` the Linear.
QUANTIZABLE_PATTERNS = (
    "word_embed",
    "blocks.*.ada_lin.1",
    "blocks.*.attn.mat_qkv",
    "blocks.*.attn.proj",
    "blocks.*.ffn.fc1",
    "blocks.*.ffn.fc2",
    "head_nm.ada_lin.1",
    "head",
)

# (fqn, linear, bits) -> (weight quantizer, input quantizer); None keeps that side FP.
LinearQuantizers = Callable[[str, nn.Linear, BitsConfig], tuple[FakeQuantizer | None, FakeQuantizer | None]]
# (block index, bits) -> {"q_quantizer" | "k_quantizer" | "attn_quantizer" | "v_quantizer": quantizer or None}
AttentionQuantizers = Callable[[int, BitsConfig], dict[str, nn.Module | None]]


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(fqn, p) for p in patterns)


@dataclass
class QuantPolicy:
    """What a method quantizes and with which quantizers.

    Args:
        linear_quantizers: factory called once per selected Linear (weights are already on their device, so a
            static weight quantizer may observe the weight right there).
        attention_quantizers: factory called once per block; None leaves attention FP (fused SDPA).
        include: FQN globs of the Linears to quantize (subset of `quantizable_linears`).
        exclude: FQN globs kept FP even if included (LiteVAR: ``blocks.*.ffn.fc2``).
        skip_single_key: see `AttentionOperandQuant` (LiteVAR).
    """

    linear_quantizers: LinearQuantizers
    attention_quantizers: AttentionQuantizers | None = None
    include: Sequence[str] = QUANTIZABLE_PATTERNS
    exclude: Sequence[str] = field(default_factory=tuple)
    skip_single_key: bool = False

    def selects(self, fqn: str) -> bool:
        return _matches(fqn, self.include) and not _matches(fqn, self.exclude)


def quantizable_linears(var: nn.Module) -> list[str]:
    """FQNs of every Linear a method may quantize, in module-registration order (QuantLinears included)."""
    return [
        fqn for fqn, m in var.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and _matches(fqn, QUANTIZABLE_PATTERNS)
    ]


def _model_device(var: nn.Module) -> torch.device:
    return next(var.parameters()).device


def _bind_token_scales(var: nn.Module, fqn: str, qlinear: QuantLinear) -> None:
    # A per-scale (STWQ) input quantizer needs the scale of every token, but blocks call `linear(x)`; the model's
    # TokenContext knows it for the tokens that flow through the blocks and the head.
    if not _matches(fqn, ("blocks.*.attn.*", "blocks.*.ffn.*", "head")):
        raise ValueError(
            f"{fqn}: a PerScale input quantizer needs one scale per input token, which only the block linears "
            f"and the head have (word_embed skips the first scale; ada_lin inputs have no token dim)"
        )
    qlinear.token_ctx = var.token_ctx


def quantize_var(var: nn.Module, policy: QuantPolicy, bits: BitsConfig) -> nn.Module:
    """Fake-quantize ``var`` in place according to ``policy``; returns the same object.

    Load FP checkpoints before calling this (parameter keys are unchanged, but new quantizer keys appear).
    """
    device = _model_device(var)
    names = [fqn for fqn in quantizable_linears(var) if policy.selects(fqn)]

    def make(fqn: str, linear: nn.Linear):
        weight_q, input_q = policy.linear_quantizers(fqn, linear, bits)
        return tuple(None if q is None else q.to(device) for q in (weight_q, input_q))

    swap_linears(var, include=names, make_quantizers=make)
    for fqn in names:
        qlinear = var.get_submodule(fqn)
        iq = qlinear.input_quantizer
        if isinstance(iq, FakeQuantizer) and isinstance(iq.spec.granularity, PerScale):
            _bind_token_scales(var, fqn, qlinear)
    if policy.attention_quantizers is not None:
        for i, block in enumerate(var.blocks):
            quantizers = policy.attention_quantizers(i, bits)
            unknown = set(quantizers) - set(OPERANDS)
            if unknown:
                raise ValueError(f"unknown attention operands {sorted(unknown)}; expected a subset of {OPERANDS}")
            block.attn.operand_quant = AttentionOperandQuant(
                **{k: None if q is None else q.to(device) for k, q in quantizers.items()},
                token_ctx=var.token_ctx, patch_nums=var.patch_nums, block_idx=i,
                skip_single_key=policy.skip_single_key,
            )
    return var


def dequantize_var(var: nn.Module) -> nn.Module:
    """Undo `quantize_var`: plain Linears with the same Parameters and fused FP attention."""
    unswap_linears(var)
    for block in var.blocks:
        block.attn.operand_quant = None
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
        i: b.attn.operand_quant for i, b in enumerate(var.blocks)
        if isinstance(b.attn.operand_quant, AttentionOperandQuant)
    }


@dataclass
class BlockQuantModules:
    """The quantized modules of one VAR block (the reconstruction units of BRECQ / Shift-and-Sum, methods.md §3.6).

    ``linears`` is keyed by full FQN (``blocks.3.attn.mat_qkv`` …); ``attn_unit`` / ``ffn_unit`` split them into the
    attention unit (mat_qkv, operands, proj) and the FFN unit (fc1, fc2); ``ada_lin`` is reconstructed as a layer.
    """

    block_idx: int
    block: nn.Module
    linears: dict[str, QuantLinear]
    attention: AttentionOperandQuant | None

    def _with_infix(self, infix: str) -> dict[str, QuantLinear]:
        return {k: v for k, v in self.linears.items() if f".{infix}." in k}

    @property
    def attn_linears(self) -> dict[str, QuantLinear]:
        return self._with_infix("attn")

    @property
    def ffn_linears(self) -> dict[str, QuantLinear]:
        return self._with_infix("ffn")

    @property
    def ada_lin(self) -> QuantLinear | None:
        return self.linears.get(f"blocks.{self.block_idx}.ada_lin.1")

    def modules(self) -> list[nn.Module]:
        """Everything quantized in this block, for `quant_enabled`."""
        return [*self.linears.values(), *([self.attention] if self.attention is not None else [])]


def block_quant_modules(var: nn.Module, block_idx: int) -> BlockQuantModules:
    block = var.blocks[block_idx]
    op = block.attn.operand_quant
    return BlockQuantModules(
        block_idx=block_idx, block=block, linears=quant_linears(block, prefix=f"blocks.{block_idx}."),
        attention=op if isinstance(op, AttentionOperandQuant) else None,
    )


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
