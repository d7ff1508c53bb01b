"""Infinity's tokenizer: a convolutional autoencoder with multi-scale binary spherical quantization (BSQ).

Key names follow ``infinity_vae_d32reg.pth`` (weights under ``"vae"``): convolutions and norms sit one level down
(``encoder.conv_in.conv.weight``, ``….norm1.norm.weight``) and the quantizer is registered twice (``quantizer`` and
its alias ``quantize``), each with the bit-mask buffer ``lfq.mask``. No attention layers; stride 16.

Quantization of a feature map: per scale, the residual is resized to the scale's grid ('area'), each token is
L2-normalised over its d channels and replaced by sign(·)/√d (d bits); the codes are resized back to the full grid
(trilinear) and subtracted from the residual. The teacher-forcing input of scale k+1 is the running sum of codes
resized to scale k+1 ('area'). The sampler resizes the same sum with trilinear interpolation instead, as the
official inference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from varq.models.fast_decoder import PhaseUpsample
from varq.models.winograd import WinogradConv2d

__all__ = ["BSQVAE", "build_bsq_vae", "bsq_quantize"]


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class _Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        # the 3×3 stride-1 convs carry eval.decoder=winograd's path (off unless set_decoder turns it on)
        conv = WinogradConv2d if (kernel, stride, padding) == (3, 1, 1) else nn.Conv2d
        self.conv = conv(c_in, c_out, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _Norm(c_in), _Conv(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _Norm(c_out), _Conv(c_out, c_out, 3, padding=1)
        self.nin_shortcut = _Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom padding only


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, padding=1)
        self.phase = PhaseUpsample()  # eval.decoder=fast: the conv at the low resolution (no parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase.enabled:
            return self.phase(x, self.conv.conv)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: Sequence[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList()  # empty: the released tokenizer has no attention (kept for the key layout)
    return level


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = _ResBlock(channels, channels), _ResBlock(channels, channels)
    return mid


class _Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, num_down: int):
        super().__init__()
        self.conv_in = _Conv(3, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[i], ch * mult
            level = _level([_ResBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)])
            if i < num_down:
                level.downsample = _Down(c_out)
            self.down.append(level)
        c = ch * ch_mult[-1]
        self.mid = _mid(c)
        self.norm_out, self.conv_out = _Norm(c), _Conv(c, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(_swish(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, num_up: int):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = _Conv(z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        levels = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):  # built from the coarsest level, indexed by level
            c_out = ch * ch_mult[i]
            level = _level([_ResBlock(c if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)])
            if 1 <= i <= num_up:
                level.upsample = _Up(c_out)
            levels[i], c = level, c_out
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _Norm(c), _Conv(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h))).contiguous()  # NCHW out of the fast decoder too


class _BitMask(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1))


class _Quantizer(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.lfq = _BitMask(bits)


def bsq_quantize(z_BdN: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary spherical quantization along ``dim``: (codes ±1/√d, bits {0, 1}).

    The forward value is ``u + (ĉ − u)`` with u the L2-normalised input (a straight-through estimator), computed
    as written so the codes match the reference bit for bit.
    """
    d = z_BdN.shape[dim]
    u = F.normalize(z_BdN, dim=dim)
    hat = torch.where(u > 0, 1.0, -1.0).to(u.dtype) * (1.0 / d**0.5)
    return u + (hat - u), (u > 0).long()


class BSQVAE(nn.Module):
    def __init__(
        self, codebook_dim: int = 32, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4, 4),
        num_res_blocks: int = 2, patch_size: int = 16,
    ):
        super().__init__()
        steps = int(math.log2(patch_size))
        if 2**steps != patch_size or steps >= len(ch_mult) + 1:
            raise ValueError(f"patch_size {patch_size} must be a power of two ≤ 2^{len(ch_mult)}")
        self.codebook_dim = self.embed_dim = codebook_dim
        self.patch_size = patch_size
        self.encoder = _Encoder(ch, ch_mult, num_res_blocks, codebook_dim, steps)
        self.decoder = _Decoder(ch, ch_mult, num_res_blocks, codebook_dim, steps)
        self.quantizer = _Quantizer(codebook_dim)
        self.quantize = self.quantizer  # the checkpoints carry the quantizer under both names

    def decode(self, codes_BdHW: torch.Tensor) -> torch.Tensor:
        """Summed codes (B, d, H, W) → images (B, 3, 16H, 16W) in [−1, 1]."""
        return self.decoder(codes_BdHW).clamp(-1, 1)

    @torch.no_grad()
    def img_to_bits(
        self, img_B3HW: torch.Tensor, hw: Sequence[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images in [−1, 1] → the bits (B, h·w, d) of every scale of ``hw`` and the teacher-forcing input (B, L−1, d).

        The last scale must equal the encoder's grid (image size / 16).
        """
        h_Bd1HW = self.encoder(img_B3HW).float().unsqueeze(2)
        B, d, _, H, W = h_Bd1HW.shape
        if tuple(hw[-1]) != (H, W):
            raise ValueError(f"the last scale {tuple(hw[-1])} must equal the latent grid {(H, W)} of the images")
        residual, summed = h_Bd1HW, torch.zeros_like(h_Bd1HW)
        bits, inputs = [], []
        for si, (ph, pw) in enumerate(hw):
            small = residual if (ph, pw) == (H, W) else F.interpolate(residual, size=(1, ph, pw), mode="area")
            codes, bits_Bd1hw = bsq_quantize(small, dim=1)
            bits.append(bits_Bd1hw.flatten(2).transpose(1, 2))
            if (ph, pw) != (H, W):
                codes = F.interpolate(codes, size=(1, H, W), mode="trilinear")
            residual = residual - codes
            summed = summed + codes
            if si + 1 < len(hw):
                nxt = F.interpolate(summed, size=(1, *hw[si + 1]), mode="area")
                inputs.append(nxt.flatten(2).transpose(1, 2))
        return bits, torch.cat(inputs, dim=1)


def build_bsq_vae(codebook_dim: int = 32, seed: int = 0, **overrides) -> BSQVAE:
    """The released tokenizer's architecture (d = 32, stride 16); deterministic, no global RNG touched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = BSQVAE(codebook_dim, **overrides)
    return vae.eval()
