"""Convolutional encoder and decoder of VAR's multi-scale VQ-VAE (the LDM "vq-f16" layout).

The module nesting is dictated by the official checkpoint `vae_ch160v4096z32.pth`: every attribute name below
(`down.{i}.block.{j}.conv1`, `mid.attn_1.qkv`, `up.{i}.upsample.conv`, ...) is a state-dict key component, so
renaming one breaks strict loading. Levels are indexed by resolution (level 0 = full resolution) in both the
encoder and the decoder, even though the decoder runs them from the lowest resolution up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from varq.models.fast_decoder import PhaseUpsample
from varq.models.winograd import WinogradConv2d


class Normalize(nn.GroupNorm):
    """GroupNorm with 32 groups and eps 1e-6, the only normalisation used by the VQ-VAE."""

    def __init__(self, channels: int) -> None:
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    # "same" padding for the stride-1 convs; the stride-2 conv of Downsample2x pads explicitly instead.
    padding = kernel_size // 2 if stride == 1 else 0
    # the 3×3 stride-1 convs carry eval.decoder=winograd's path (off unless set_decoder turns it on)
    conv = WinogradConv2d if (kernel_size, stride) == (3, 1) else nn.Conv2d
    return conv(c_in, c_out, kernel_size, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus a 1×1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = _conv(in_channels, out_channels, 3)
        self.norm2 = Normalize(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        # Identity has no parameters, so same-width blocks carry no `nin_shortcut.*` keys, as in the checkpoint.
        self.nin_shortcut: nn.Module = (
            _conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw), inplace=True))  # in place on a fresh norm output
        h_BChw = self.conv2(F.silu(self.norm2(h_BChw), inplace=True))
        shortcut_BChw = self.nin_shortcut(x_BChw)
        if torch.result_type(h_BChw, shortcut_BChw) != h_BChw.dtype:
            # under autocast conv2 gives bf16/fp16 while an identity shortcut is still fp32: the sum is fp32, as in
            # the official code, so it cannot be written into conv2's output
            return shortcut_BChw + h_BChw
        # the residual sum written into conv2's fresh output (a + b == b + a exactly): one full-resolution tensor
        # fewer per block, which a CPU would page-fault in (168 MB at 256², batch 4, 160 channels)
        return h_BChw.add_(shortcut_BChw)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1×1 `qkv` conv (3C channels, q|k|v) and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = _conv(channels, 3 * channels, 1)
        self.proj_out = _conv(channels, channels, 1)
        self.scale = channels**-0.5

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        # The qkv output channels are laid out as [q (C) | k (C) | v (C)].
        q_BCl, k_BCl, v_BCl = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, H * W).unbind(1)
        attn_Bll = torch.softmax(torch.bmm(q_BCl.transpose(1, 2), k_BCl) * self.scale, dim=-1)  # (query, key)
        out_BCl = torch.bmm(v_BCl, attn_Bll.transpose(1, 2))
        return x_BChw + self.proj_out(out_BCl.reshape(B, C, H, W))


class Downsample2x(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3×3 conv (asymmetric padding, as in the LDM code)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2x(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (computed at the low resolution under ``eval.decoder=fast``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, 3)
        self.phase = PhaseUpsample()  # no parameters: the state dict keeps the checkpoint's keys

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        if self.phase.enabled:
            return self.phase(x_BChw, self.conv)
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Res → (attention) → Res at the lowest resolution; keys `block_1`, `attn_1`, `block_2`."""

    def __init__(self, channels: int, with_attn: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1: nn.Module = AttnBlock(channels) if with_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BChw)))


class _Level(nn.Module):
    """One resolution level: `block.{j}` Res blocks, each followed by `attn.{j}` when the level has attention."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        # An empty ModuleList (not Identity) keeps the key layout of levels without attention.
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks) if with_attn)

    def _blocks(self, h_BChw: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h_BChw = block(h_BChw)
            if len(self.attn) > 0:
                h_BChw = self.attn[j](h_BChw)
        return h_BChw


class DownLevel(_Level):
    """Encoder level: blocks, then an optional `downsample` (absent at the lowest resolution)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, downsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, with_attn)
        self.downsample = Downsample2x(out_channels) if downsample else None

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self._blocks(h_BChw)
        return self.downsample(h_BChw) if self.downsample is not None else h_BChw


class UpLevel(_Level):
    """Decoder level: blocks, then an optional `upsample` (absent at full resolution)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, upsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, with_attn)
        self.upsample = Upsample2x(out_channels) if upsample else None

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self._blocks(h_BChw)
        return self.upsample(h_BChw) if self.upsample is not None else h_BChw


def _attn_levels(ch_mult: Sequence[int], attn_levels: Sequence[int] | None) -> frozenset[int]:
    # Official layout: attention only at the lowest-resolution level (plus the mid block).
    return frozenset((len(ch_mult) - 1,) if attn_levels is None else attn_levels)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → latent (B, z_channels, H/2^(L-1), W/2^(L-1)) with L = len(ch_mult)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = 3,
        attn_levels: Sequence[int] | None = None,
        mid_attn: bool = True,
    ) -> None:
        super().__init__()
        with_attn = _attn_levels(ch_mult, attn_levels)
        n_levels = len(ch_mult)
        self.conv_in = _conv(in_channels, ch, 3)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            self.down.append(DownLevel(c_in, c_out, num_res_blocks, i in with_attn, downsample=i != n_levels - 1))
            c_in = c_out
        self.mid = MidBlock(c_in, mid_attn)
        self.norm_out = Normalize(c_in)
        self.conv_out = _conv(c_in, z_channels, 3)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv_in(x_BChw)
        for level in self.down:
            h_BChw = level(h_BChw)
        h_BChw = self.mid(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw), inplace=True))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, in_channels, h·2^(L-1), w·2^(L-1)); levels run from L-1 down to 0."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = 3,
        attn_levels: Sequence[int] | None = None,
        mid_attn: bool = True,
    ) -> None:
        super().__init__()
        with_attn = _attn_levels(ch_mult, attn_levels)
        c_in = ch * ch_mult[-1]
        self.conv_in = _conv(z_channels, c_in, 3)
        self.mid = MidBlock(c_in, mid_attn)
        # Built in execution order (lowest resolution first), stored by resolution level so that `up.0` is the
        # full-resolution level, matching the checkpoint keys. The decoder has one more Res block per level.
        levels: list[UpLevel] = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            levels.append(UpLevel(c_in, c_out, num_res_blocks + 1, i in with_attn, upsample=i != 0))
            c_in = c_out
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = Normalize(c_in)
        self.conv_out = _conv(c_in, in_channels, 3)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h_BChw = level(h_BChw)
        # NCHW out whatever layout the fast decoder computed in (a no-op for the reference decoder)
        return self.conv_out(F.silu(self.norm_out(h_BChw), inplace=True)).contiguous()
