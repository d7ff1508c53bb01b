"""Replay given token sequences through VAR scale by scale with the KV cache, exactly as sampling runs the model.

Teacher forcing (``var(label, x)``) and KV-cached sampling agree for the FP model, but not once K and V are
quantized dynamically over the key axis: at scale k a cached step sees only the keys of scales 0..k, so its K/V
ranges differ from those of the full-sequence pass. Methods that must score or reconstruct the model *as it will
be sampled* (Shift-and-Sum feeds the scales in order with the cache on, methods.md §3.6) replay with this.
"""

from __future__ import annotations

import torch

__all__ = ["forward_kv_cached"]


def forward_kv_cached(
    var, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, num_cond: int | None = None,
) -> torch.Tensor:
    """Logits (B, L, V) fp32 of the scale-by-scale pass over the teacher inputs (``CalibSet.teacher_input_NLC``).

    Follows the sampler step for step (SOS tokens from the class embedding, ``word_embed`` per scale, no attention
    mask), so with ``num_cond`` = B/2 and a [cond; uncond] batch the logits equal what ``generate`` computes for
    those tokens. Gradient mode is the caller's choice.
    """
    B = label_B.shape[0]
    ctx = var.token_ctx
    cond_BD = var.class_emb(label_B)
    lvl_pos_1LC = var.lvl_pos_1LC()
    x_BlC = cond_BD.unsqueeze(1) + var.pos_start.expand(B, -1, -1) + lvl_pos_1LC[:, : var.first_l]
    logits = []
    var.set_kv_caching(True)
    try:
        for si in range(len(var.patch_nums)):
            begin, end = var.begin_ends[si]
            if si > 0:
                x_BlCv = x_BLCv_wo_first_l[:, begin - var.first_l : end - var.first_l]
                x_BlC = var.word_embed(x_BlCv.float()) + lvl_pos_1LC[:, begin:end]
            ctx.scale_idx_L, ctx.num_cond = var.lvl_1L[0, begin:end], num_cond
            h_BlC = var.run_blocks(x_BlC, cond_BD, attn_bias=None)
            logits.append(var.get_logits(h_BlC, cond_BD))
    finally:
        var.set_kv_caching(False)
        ctx.scale_idx_L = ctx.num_cond = None
    return torch.cat(logits, dim=1)
