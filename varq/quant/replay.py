"""Replay given token sequences through the model scale by scale with the KV cache, exactly as sampling runs the model.

Teacher forcing (``var(label, x)``) and KV-cached sampling agree for the FP model, but not once K and V are
quantized dynamically over the key axis: at scale k a cached step sees only the keys of scales 0..k, so its K/V
ranges differ from those of the full-sequence pass. Methods that must score or reconstruct the model *as it will
be sampled* (Shift-and-Sum feeds the scales in order with the cache on, methods.md §3.6) replay with this.
"""

from __future__ import annotations

import torch

from varq.models.lookup import adapter_for

__all__ = ["forward_kv_cached"]


def forward_kv_cached(
    var, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, num_cond: int | None = None,
) -> torch.Tensor:
    """Logits (B, L, V) fp32 of the scale-by-scale pass over the teacher inputs (``CalibSet.teacher_input_NLC``).

    Runs the adapter's KV-cached steps, as the sampler does, with each next input embedded from the teacher
    tokens instead of sampled ones; so with ``num_cond`` = B/2 and a [cond; uncond] batch the logits equal what
    ``generate`` computes for those tokens. Gradient mode is the caller's choice.
    """
    adapter = adapter_for(var)
    logits = []
    with adapter.kv_session(label_B, num_cond) as session:
        x_BlC = session.first_input()
        offset = adapter.sink_tokens  # the teacher inputs start after the first scale
        for si, (begin, end) in enumerate(adapter.scale_bounds):
            if si > 0:
                x_BlC = session.embed(si, x_BLCv_wo_first_l[:, begin - offset : end - offset])
            logits.append(session.step(si, x_BlC))
    return torch.cat(logits, dim=1)
