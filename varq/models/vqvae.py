"""VAR's multi-scale VQ-VAE: encoder → quant_conv → multi-scale quantizer → post_quant_conv → decoder.

State-dict compatible with the official `vae_ch160v4096z32.pth` (324 keys, 108,948,355 parameters plus the buffer
`quantize.ema_vocab_hit_SV`). Images are RGB in [-1, 1]; the default configuration maps 256² images to a 16² latent
with 32 channels and 10 token maps of sides (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from varq.models.msvq import MultiScaleVectorQuantizer
from varq.models.vae_blocks import Decoder, Encoder

OFFICIAL_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class VQVAE(nn.Module):
    """The VQ-VAE with the official module names; see `build_vqvae` for a ready-to-use (eval, frozen) instance."""

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        quant_conv_ks: int = 3,
        in_channels: int = 3,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        self.vocab_size = self.V = vocab_size
        self.Cvae = z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        coder_cfg = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                         in_channels=in_channels)
        self.encoder = Encoder(**coder_cfg)
        self.decoder = Decoder(**coder_cfg)
        self.quantize = MultiScaleVectorQuantizer(
            vocab_size, z_channels, self.patch_nums, quant_resi=quant_resi, share_quant_resi=share_quant_resi,
            beta=beta,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=pad)

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent f (B, Cvae, H/16, W/16) before quantization."""
        return self.quant_conv(self.encoder(img_B3HW))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode a (quantized) latent to an image clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor) -> list[torch.Tensor]:
        """Token maps of an image batch: one LongTensor (B, pn²) per scale, row-major."""
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(inp_img_no_grad), to_fhat=False)

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing VAR input (B, L - patch_nums[0]², Cvae); see the quantizer."""
        return self.quantize.idxBl_to_var_input(gt_ms_idx_Bl)

    def idxBl_to_img(
        self, ms_idx_Bl: Sequence[torch.Tensor], same_shape: bool, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Decode token maps: the image after every scale, or (last_one) only the final one."""
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embed_map(idx_Bl, pn))
        return self.embed_to_img(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Decode per-scale code maps (B, Cvae, pn, pn): every cumulative image, or only the last one."""
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f_hats)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(
        self, x: torch.Tensor, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Encode, quantize and decode: the reconstruction after every scale, or (last_one) only the final one."""
        f_hats = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=True)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Strict loading, except that a usage buffer with another number of scales is ignored.

        `quantize.ema_vocab_hit_SV` is a training statistic shaped (num_scales, V); checkpoints trained with other
        patch_nums carry a different first dimension, which must not block loading (the official loader does the same).
        """
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict = {**state_dict, key: self.quantize.ema_vocab_hit_SV}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_vqvae(seed: int = 0, **overrides: Any) -> VQVAE:
    """A VQVAE with the official configuration unless overridden, in eval mode with frozen parameters.

    Initialisation is PyTorch's default (convs kaiming-uniform, GroupNorm ones/zeros, codebook N(0, 1)), drawn from
    `seed` inside a forked CPU RNG, so the result is deterministic and the caller's global RNG state is untouched.
    No `reset_parameters` patching: every tensor is initialised (official pitfall P1/P2).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(**overrides)
    vae.eval()
    vae.requires_grad_(False)
    return vae
