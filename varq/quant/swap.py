"""Swap `nn.Linear`s for `QuantLinear`s by fully-qualified name (never by list index)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from .qmodules import QuantLinear
from .quantizer import FakeQuantizer

__all__ = ["MakeQuantizers", "swap_linears", "unswap_linears"]

# (fqn, linear) -> (weight_quantizer, input_quantizer); None leaves that side in FP.
MakeQuantizers = Callable[[str, nn.Linear], tuple[FakeQuantizer | None, FakeQuantizer | None]]


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    # fnmatch's `*` also crosses dots: "blocks.*.attn.*" matches "blocks.0.attn.mat_qkv".
    return any(fnmatchcase(fqn, p) for p in patterns)


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def swap_linears(
    model: nn.Module,
    include: Sequence[str],
    exclude: Sequence[str] = (),
    make_quantizers: MakeQuantizers | None = None,
) -> list[str]:
    """Replace every plain `nn.Linear` whose FQN matches `include` and no `exclude` glob, in place.

    Returns the swapped FQNs in module-registration order. A `QuantLinear` already in place is left
    alone, so swapping twice is harmless. Without `make_quantizers` the wrappers have no quantizers.
    """
    swapped = []
    for fqn, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _matches(fqn, include) or _matches(fqn, exclude):
            continue
        if not fqn:
            raise ValueError("the root module itself is a Linear; wrap it in a container first")
        weight_q, input_q = make_quantizers(fqn, module) if make_quantizers is not None else (None, None)
        _set_submodule(model, fqn, QuantLinear(module, weight_q, input_q))
        swapped.append(fqn)
    return swapped


def unswap_linears(model: nn.Module) -> list[str]:
    """Turn every `QuantLinear` back into an `nn.Linear` with the same Parameters; returns their FQNs."""
    restored = []
    for fqn, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            _set_submodule(model, fqn, module.to_linear())
            restored.append(fqn)
    return restored
