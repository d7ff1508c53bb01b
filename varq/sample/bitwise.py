"""KV-cached, scale-by-scale bitwise sampling of Infinity with classifier-free guidance (the official semantics).

Each token of scale k is a d-bit code; the model gives two logits per bit. Per scale: logits / tau, then
guidance on logits ``cfg·cond + (1 − cfg)·uncond`` (constant over scales, unlike VAR's ramp), then every bit is
drawn on its own from the top-p filtered pair of logits (top-k is a no-op on two values). Drawn bits become BSQ codes
±1/√d, summed at the last scale's resolution; the next scale's input is that sum resized to the next grid
(trilinear, as the tokenizer's ``z_interplote_up``), then embedded by ``word_embed``.

The random stream is consumed like the official ``autoregressive_infer_cfg``: one ``multinomial`` over all B·l·d
bit rows per scale from the given generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from varq.models.infinity import Infinity, TextCond
from varq.models.lookup import adapter_for
from varq.sample.filtering import sample_top_k_top_p_
from varq.sample.sampler import autocast_context

__all__ = ["BitwiseSample", "bits_to_codes", "generate_bitwise", "per_scale", "teacher_inputs"]

# on_logits(si, logits_2BlV): both CFG halves (divided by tau) before mixing;
# override_bits(si, bits_Bld) -> bits_Bld (teacher forcing, tests)
LogitsHook = Callable[[int, torch.Tensor], None]
BitsHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class BitwiseSample:
    bits_Bld: list[torch.Tensor]  # per scale: (B, h·w, d) int64 in {0, 1}
    codes_BdHW: torch.Tensor  # the summed codes at the last scale's grid (the tokenizer's decoder input)
    images_B3HW: torch.Tensor | None  # in [0, 1] when a decoder was given


def per_scale(value: float | Sequence[float], num_scales: int, name: str) -> list[float]:
    """A constant or one value per scale (at least ``num_scales`` of them) → a list of ``num_scales`` floats."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_scales
    values = [float(v) for v in value]
    if len(values) < num_scales:
        raise ValueError(f"{name} lists {len(values)} values; the schedule has {num_scales} scales")
    return values[:num_scales]


def bits_to_codes(bits_Bhwd: torch.Tensor, codebook_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bits {0, 1} → BSQ codes: each bit to ±1/√d, then L2-normalised over the d bits (as the tokenizer does)."""
    s = 1 / np.sqrt(codebook_dim)
    return F.normalize(bits_Bhwd.to(dtype) * s * 2 - s, dim=-1)


def _resize(codes_Bd1hw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(codes_Bd1hw, size=(1, *hw), mode="trilinear")


@torch.no_grad()
def generate_bitwise(
    model: Infinity,
    text: TextCond,
    *,
    cfg: float | Sequence[float] = 3.0,
    tau: float | Sequence[float] = 1.0,
    top_k: int = 0,
    top_p: float = 0.97,
    rng: torch.Generator | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_logits: LogitsHook | None = None,
    override_bits: BitsHook | None = None,
    reference_loop: bool = False,
) -> BitwiseSample:
    """Sample B images for the text condition ``text`` (B rows) at the model's current scale schedule.

    ``decode``: the tokenizer's decoder (codes (B, d, H, W) → images in [−1, 1]); without it only codes come back.
    ``reference_loop=True`` grows the KV cache by ``cat`` and recomputes the AdaLN vectors and text K/V at every
    scale; the default preallocates and computes them once. Both give the same values.
    """
    adapter = adapter_for(model)
    device = model.pos_start.device
    text = text.to(device)
    B, S, d = text.batch_size, adapter.num_scales, model.Cvae
    cfg_s, tau_s = per_scale(cfg, S, "cfg"), per_scale(tau, S, "tau")
    if any(t <= 0 for t in tau_s):
        raise ValueError(f"tau must be positive, got {tau_s}")
    hw = model.patch_nums
    H, W = hw[-1]
    dtype = model.word_embed.weight.dtype  # the codes are the model's input: fp32 unless the model was cast
    summed_Bd1HW = torch.zeros(B, d, 1, H, W, device=device, dtype=dtype)
    bits_out = []
    pair = model.cfg_pair(text)  # outside autocast: CPU autocast refuses fp16 (T5) tensors in `cat`
    with autocast_context(device, autocast_dtype), adapter.kv_session(
        pair, num_cond=B, static_modulation=not reference_loop, preallocate=not reference_loop,
    ) as session:
        x_2BlC = session.first_input()
        for si, (h, w) in enumerate(hw):
            logits_2BlV = session.step(si, x_2BlC)
            if not torch.isfinite(logits_2BlV).all():
                raise FloatingPointError(f"non-finite logits at scale {si} ({h}x{w}): check the model/quantizer")
            logits_2BlV = logits_2BlV.mul(1 / tau_s[si])
            if on_logits is not None:
                on_logits(si, logits_2BlV)
            logits_BlV = cfg_s[si] * logits_2BlV[:B] + (1 - cfg_s[si]) * logits_2BlV[B:]
            l = logits_BlV.shape[1]
            bits_Bld = sample_top_k_top_p_(logits_BlV.reshape(B, l * d, 2), top_k=top_k, top_p=top_p, rng=rng)
            bits_Bld = bits_Bld.view(B, l, d)
            if override_bits is not None:
                bits_Bld = override_bits(si, bits_Bld)
            bits_out.append(bits_Bld)
            codes_Bd1hw = bits_to_codes(bits_Bld.view(B, h, w, d), d, dtype).permute(0, 3, 1, 2).unsqueeze(2)
            if si == S - 1:
                summed_Bd1HW = summed_Bd1HW + codes_Bd1hw
                break
            summed_Bd1HW = summed_Bd1HW + _resize(codes_Bd1hw, (H, W))
            next_Bd1hw = _resize(summed_Bd1HW, hw[si + 1])
            x_BlCv = next_Bd1hw.flatten(2).transpose(1, 2)
            x_2BlC = session.embed(si + 1, x_BlCv).repeat(2, 1, 1)
    codes_BdHW = summed_Bd1HW.squeeze(2)
    images = None if decode is None else decode(codes_BdHW).float().add(1).mul(0.5)
    return BitwiseSample(bits_out, codes_BdHW, images)


def teacher_inputs(model: Infinity, bits_per_scale: Sequence[torch.Tensor]) -> torch.Tensor:
    """The teacher-forcing input (B, L − 1, d) that sampling these bits feeds the model, scale by scale."""
    hw = model.patch_nums
    B, d = bits_per_scale[0].shape[0], model.Cvae
    H, W = hw[-1]
    dtype = model.word_embed.weight.dtype
    summed_Bd1HW = torch.zeros(B, d, 1, H, W, device=bits_per_scale[0].device, dtype=dtype)
    inputs = []
    for si, (h, w) in enumerate(hw[:-1]):
        codes = bits_to_codes(bits_per_scale[si].view(B, h, w, d), d, dtype).permute(0, 3, 1, 2).unsqueeze(2)
        summed_Bd1HW = summed_Bd1HW + _resize(codes, (H, W))
        inputs.append(_resize(summed_Bd1HW, hw[si + 1]).flatten(2).transpose(1, 2))
    return torch.cat(inputs, dim=1)
