"""Teacher-forced calibration passes for training-free methods: batches, the forward, input capture, observation.

Static quantizers are fitted on full-sequence teacher-forced passes over a `CalibSet`. With the block-causal mask
(the default) that pass is, token for token, the KV-cached pass the sampler runs; PTQ4ARVG's released code ran it
without the mask (methods.md §4.9), which ``masked=False`` reproduces, and with the quantizers upstream of each
observed one switched on (``observe_static_quantizers(quantized=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from varq.models.lookup import adapter_for
from varq.quant.quantizer import FakeQuantizer

__all__ = ["CalibBatch", "calib_batches", "teacher_forward", "capture_inputs", "observe_static_quantizers"]


@dataclass
class CalibBatch:
    label_B: torch.Tensor
    x_BLCv: torch.Tensor
    num_cond: int | None  # [cond; uncond] pair layout, as in sampling, or None for a plain list of rows


def calib_batches(calib_set, batch_size: int, device: torch.device | str) -> list[CalibBatch]:
    """Teacher batches of ``calib_set`` covering both CFG halves.

    A set that already holds null-class rows (``calib=dgc`` picks its cond/uncond mix) is used row by row; a set of
    conditional rows only (``calib=random``) gets each row's unconditional copy, as the sampler's CFG batch has.
    """
    if batch_size < 1:
        raise ValueError(f"calibration batch_size must be >= 1, got {batch_size}")
    has_uncond = bool((calib_set.labels_N == calib_set.num_classes).any())
    out = []
    if has_uncond:
        for start in range(0, len(calib_set), batch_size):
            label_B, x_BLCv = calib_set.teacher_batch(slice(start, start + batch_size), device)
            out.append(CalibBatch(label_B, x_BLCv, None))
    else:
        half = max(1, batch_size // 2)  # a pair batch holds 2·half rows
        for start in range(0, len(calib_set), half):
            label_B, x_BLCv = calib_set.teacher_batch(slice(start, start + half), device, with_uncond=True)
            out.append(CalibBatch(label_B, x_BLCv, label_B.shape[0] // 2))
    return out


def teacher_forward(var: nn.Module, batch: CalibBatch, masked: bool = True) -> torch.Tensor:
    """Logits of the full-sequence pass; ``masked=False`` drops the block-causal mask (released PTQ4ARVG)."""
    return adapter_for(var).teacher_forward(batch.label_B, batch.x_BLCv, num_cond=batch.num_cond, masked=masked)


@torch.no_grad()
def capture_inputs(
    var: nn.Module,
    fqns: Sequence[str],
    batches: Iterable[CalibBatch],
    on_input: Callable[[str, torch.Tensor], None],
    masked: bool = True,
) -> None:
    """Run every batch and hand each listed module's input (B, L, C) to ``on_input(fqn, x)``; outputs unchanged."""
    handles = [
        var.get_submodule(fqn).register_forward_pre_hook(lambda mod, args, fqn=fqn: on_input(fqn, args[0]))
        for fqn in fqns
    ]
    try:
        for batch in batches:
            teacher_forward(var, batch, masked)
    finally:
        for h in handles:
            h.remove()


def _quantize_after_observing(q: FakeQuantizer, args, out: torch.Tensor) -> torch.Tensor:
    # forward hook of an observing quantizer: its forward recorded the batch and returned it unchanged; hand the
    # layer the batch quantized with the range just updated instead, as the released PTQ4ARVG code does
    q.observing = False
    q.frozen.fill_(True)
    try:
        return q.forward(*args)
    finally:
        q.frozen.fill_(False)
        q.observing = True


@torch.no_grad()
def observe_static_quantizers(
    var: nn.Module, batches: Iterable[CalibBatch], masked: bool = True, quantized: bool = False,
) -> list[str]:
    """Fit every unfrozen static quantizer of ``var`` (activations; weights are fitted when built) and freeze it.

    ``quantized=False``: every observing quantizer passes its input through unchanged and weights are FP, so each
    one sees FP statistics. ``quantized=True`` (released PTQ4ARVG): weights and frozen quantizers stay on and each
    observing quantizer quantizes its batch with its updated range, so every quantizer sees the quantization error
    of everything upstream of it. Returns the FQNs that were fitted; a non-finite range stops with the quantizer
    named.
    """
    targets = {
        fqn: q for fqn, q in var.named_modules()
        if isinstance(q, FakeQuantizer) and not q.spec.dynamic and not q.is_frozen
    }
    weight_qs = [
        q for fqn, q in var.named_modules() if isinstance(q, FakeQuantizer) and fqn.endswith("weight_quantizer")
    ]
    saved = [(q, q.enabled) for q in weight_qs]
    handles = []
    try:
        for q in weight_qs:
            q.enabled = q.enabled and quantized
        for q in targets.values():
            q.observing = True
            if quantized:
                handles.append(q.register_forward_hook(_quantize_after_observing))
        for batch in batches:
            teacher_forward(var, batch, masked)
    finally:
        for h in handles:
            h.remove()
        for q in targets.values():
            q.observing = False
        for q, flag in saved:
            q.enabled = flag
    for fqn, q in targets.items():
        q.freeze()
        if not (bool(torch.isfinite(q.range_min).all()) and bool(torch.isfinite(q.range_max).all())):
            raise FloatingPointError(f"non-finite calibration range in {fqn}: check the calibration set and model")
    return list(targets)
