"""Transform stages folded into a model, and their place in a quantizer state.

A stage is one fold of per-channel transforms: {consumer Linear fqn: (s_C, δ_C or None)}, folded exactly into the
preceding AdaLN (`varq.quant.transforms.fold_channel_transform`). A state stores stage i under
``transforms.<i>.<fqn>.{scale_C,shift_C}`` next to the quantizer keys, so a load replays the folds in order.
"""

from __future__ import annotations

import torch
from torch import nn

from varq.quant.transforms import adaln_sites, fold_channel_transform

__all__ = ["Stage", "TRANSFORM_PREFIX", "apply_stage", "stages_state", "split_state"]

TRANSFORM_PREFIX = "transforms."
Stage = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def apply_stage(var: nn.Module, stage: Stage) -> None:
    sites = adaln_sites(var)
    for fqn, (s_C, delta_C) in stage.items():
        fold_channel_transform(var, sites[fqn], s_C, delta_C)


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
