"""Reconstruction units over the model adapter's stages, and the row-wise helpers that feed them (methods.md §3.6).

The adapter (`varq.models.adapter`) cuts the forward pass into stages and moves a `Stream` (one model's
activations of every calibration row at a stage boundary) through them, so each model runs exactly once over the
calibration set. Each block-mode unit is one stage; in layer mode the attention and FFN stages split into one unit
per Linear. The quantized model's attention is replayed scale by scale with the KV cache (as sampling runs it), or
with ``attention_pass="vectorised"`` as one pass that computes the same for every scale (block-mode attention units);
the FP targets come from the masked teacher-forced pass (numerically the same for an unquantized model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from varq.models.adapter import Stage
from varq.models.lookup import adapter_for
from varq.quant.model import quant_enabled
from varq.quant.qmodules import QuantLinear

__all__ = ["stage_linears", "capture_input", "map_rows", "run_linear", "fp_stage_output", "weights_once"]

ROW_CHUNK = 16  # rows per forward when running a stage over the whole calibration set (bounds attention memory)


def stage_linears(var: nn.Module, stage: Stage) -> dict[str, QuantLinear]:
    """The stage's QuantLinears with a weight quantizer, by full FQN, in registration order."""
    module = var.get_submodule(stage.name)
    found = {stage.name: module} if isinstance(module, QuantLinear) else {
        f"{stage.name}.{fqn}": m for fqn, m in module.named_modules() if isinstance(m, QuantLinear)
    }
    return {fqn: m for fqn, m in found.items() if m.weight_quantizer is not None}


class _PrecomputedWeight(nn.Module):
    """Stands in for a weight quantizer for the duration of one unit forward (see `weights_once`)."""

    def __init__(self, w_hat: torch.Tensor) -> None:
        super().__init__()
        self.w_hat = w_hat

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.w_hat


@contextlib.contextmanager
def weights_once(linears: dict[str, QuantLinear]) -> Iterator[None]:
    """Fake-quantize each weight once for a whole unit forward.

    While AdaRound is soft the quantizer cannot cache, and the KV-cached replay calls mat_qkv and proj once per scale
    (10× per step at 256 px); computing the soft weight once keeps one graph node per weight and 1/10 of the work.
    """
    saved = {fqn: m.weight_quantizer for fqn, m in linears.items()}
    try:
        for m in linears.values():
            m.weight_quantizer = _PrecomputedWeight(m.weight_quantizer(m.weight))
        yield
    finally:
        for fqn, m in linears.items():
            m.weight_quantizer = saved[fqn]


def run_linear(var: nn.Module, linear: nn.Module, x: torch.Tensor, scale_idx_L: torch.Tensor | None) -> torch.Tensor:
    """One Linear of a stage alone (layer units), with the token scales its input quantizer may need."""
    with adapter_for(var).token_context(scale_idx_L):
        return linear(x)


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], x_N: torch.Tensor, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """``fn`` over row chunks of ``x_N``, concatenated (no gradients)."""
    with torch.no_grad():
        return torch.cat([fn(x_N[i : i + chunk]) for i in range(0, x_N.shape[0], chunk)])


def capture_input(var: nn.Module, stage: Stage, x_N: torch.Tensor, module: nn.Module, kv_cached: bool) -> torch.Tensor:
    """The input ``module`` (a Linear inside the stage) receives when the stage runs on ``x_N``, for every row."""
    adapter = adapter_for(var)
    got: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))

    def one_chunk(x: torch.Tensor) -> torch.Tensor:
        got.clear()
        adapter.run_stage(stage, x, kv_cached)
        return torch.cat(got, dim=1)  # KV-cached attention calls the Linear once per scale

    try:
        return map_rows(one_chunk, x_N)
    finally:
        handle.remove()


@torch.no_grad()
def fp_stage_output(fp_var: nn.Module, stage: Stage, x_N: torch.Tensor) -> torch.Tensor:
    """FP targets of a stage; quantizers of ``fp_var`` (if any) are switched off, so a quantized copy also works."""
    with quant_enabled(fp_var, weights=False, activations=False):
        adapter = adapter_for(fp_var)
        return map_rows(lambda x: adapter.run_stage(stage, x, kv_cached=False), x_N)
