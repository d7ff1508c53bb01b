"""Find a model's adapter: ``adapter_for(model)`` (see `varq.models.adapter` for what an adapter provides).

Kept apart from the contract module because it imports each family's adapter module by name: the adapters import
the contract, and nothing under `varq.models` imports this, so the two never form an import cycle.
"""

from __future__ import annotations

import importlib

from torch import nn

from varq.models.adapter import REGISTERED, ModelAdapter

__all__ = ["adapter_for"]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family (its module ``varq.models.<family>_adapter`` is imported on first use)."""
    family = getattr(model, "family", None)
    if not family:
        raise TypeError(f"{type(model).__name__} declares no model family (a `family` class attribute)")
    if family not in REGISTERED:
        importlib.import_module(f"varq.models.{family}_adapter")
    if family not in REGISTERED:
        raise KeyError(f"varq.models.{family}_adapter registers no adapter for family '{family}'")
    return REGISTERED[family](model)
