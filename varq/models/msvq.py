"""Multi-scale residual vector quantizer of VAR's VQ-VAE (the official `VectorQuantizer2` semantics).

A latent f (B, C, H, W) is explained coarse-to-fine by one token map per scale pn ∈ patch_nums (the last one is the
latent side H = W). At scale si the residual is area-downsampled to pn×pn, each position takes its nearest code,
the code map is bicubic-upsampled back to H×W, passed through φ_si, and added to the running reconstruction f_hat.

Key names follow the checkpoint: `embedding.weight` (V, C), `quant_resi.qresi_ls.{k}.weight/bias` (the K shared φ
convs) and the buffer `ema_vocab_hit_SV` (S, V), a training statistic that inference never reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def phi_index_table(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Which of the `num_phi` shared φ convs each scale uses: the tick nearest to si/(S-1).

    Ticks are linspace(1/(3K), 1-1/(3K), K) for K = 4 and linspace(1/(2K), 1-1/(2K), K) otherwise (the official
    rule). Computed with numpy in float64 on purpose: for S = 10, K = 4 the scale si = 2 is an exact mathematical tie
    between convs 0 and 1 that only the float64 rounding of numpy's linspace breaks (towards 1).
    """
    if num_scales == 1:
        return (0,)
    denom = 3 * num_phi if num_phi == 4 else 2 * num_phi
    ticks = np.linspace(1 / denom, 1 - 1 / denom, num_phi)
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


class Phi(nn.Module):
    """φ(h) = (1 - r)·h + r·conv3x3(h), with the conv's `weight`/`bias` held directly (checkpoint keys).

    Deliberately not an `nn.Conv2d` subclass: a module-swap quantizer that replaces every Conv2d would otherwise
    silently drop the residual mix.
    """

    def __init__(self, channels: int, resi_ratio: float) -> None:
        super().__init__()
        self.resi_ratio = abs(resi_ratio)
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The PyTorch `nn.Conv2d` default init (kaiming-uniform weight, fan-in-bounded uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        conv_BChw = F.conv2d(h_BChw, self.weight, self.bias, padding=1)
        return h_BChw * (1 - self.resi_ratio) + conv_BChw * self.resi_ratio


class PhiBank(nn.Module):
    """K partially shared φ convs (`qresi_ls.{k}`) and the fixed scale → conv assignment."""

    def __init__(self, channels: int, resi_ratio: float, num_phi: int, num_scales: int) -> None:
        super().__init__()
        # A zero ratio makes φ the identity; the checkpoint then has no φ keys, so build no parameters either.
        make = (lambda: Phi(channels, resi_ratio)) if abs(resi_ratio) > 1e-6 else nn.Identity
        self.qresi_ls = nn.ModuleList(make() for _ in range(num_phi))
        self.phi_idx = phi_index_table(num_scales, num_phi)

    def __getitem__(self, si: int) -> nn.Module:
        """The φ module of scale index si (an integer scale index, unlike the official float key si/(S-1))."""
        return self.qresi_ls[self.phi_idx[si]]


class MultiScaleVectorQuantizer(nn.Module):
    """Residual VQ over the scales `patch_nums` with a codebook of `vocab_size` codes of width `Cvae`."""

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        patch_nums: Sequence[int],
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        if share_quant_resi < 2:
            # 0 (one φ per scale) and 1 (a single φ) use other key layouts (`quant_resi.{k}`, `quant_resi.qresi`).
            raise ValueError(f"share_quant_resi={share_quant_resi} is not supported; use >= 2 (official: 4)")
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.beta = beta
        self.quant_resi = PhiBank(Cvae, quant_resi, share_quant_resi, len(self.patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        # PyTorch's Embedding default: N(0, 1). Real checkpoints overwrite it; tests rely on well-separated codes.
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, phi_idx={self.quant_resi.phi_idx}, beta={self.beta}"

    # ----------------------------------------------------------------------------------------------- helpers
    def _nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code by squared euclidean distance; ties go to the lowest index (argmin)."""
        z_NC, codes_VC = z_NC.detach(), self.embedding.weight.detach()
        # |z|² + |e|² - 2 z·e in one addmm, the same float32 evaluation order as the official code, so that
        # indices agree exactly with checkpoints' reference outputs.
        dist_NV = z_NC.square().sum(dim=1, keepdim=True) + codes_VC.square().sum(dim=1)
        dist_NV = torch.addmm(dist_NV, z_NC, codes_VC.T, beta=1, alpha=-2)
        return dist_NV.argmin(dim=1)

    def embed_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn²) row-major indices → (B, C, pn, pn) code map."""
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    def _up_phi(self, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """Bicubic-upsample a scale's code map to the latent side (skipped at the last scale), then apply φ_si."""
        side = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
        return self.quant_resi[si](h_BChw)

    def _check_latent(self, f_BChw: torch.Tensor) -> None:
        H, W = f_BChw.shape[-2:]
        if H != self.patch_nums[-1] or W != self.patch_nums[-1]:
            raise ValueError(f"latent is {H}x{W} but patch_nums ends at {self.patch_nums[-1]}")

    def _residual_quantize(self, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The coarse-to-fine loop: per scale the (B, pn²) indices and the cumulative f_hat (B, C, H, W)."""
        self._check_latent(f_BChw)
        B, C = f_BChw.shape[:2]
        S = len(self.patch_nums)
        f_rest_BChw = f_BChw.detach().clone()
        f_hat_BChw = torch.zeros_like(f_rest_BChw)
        idx_per_scale, fhat_per_scale = [], []
        for si, pn in enumerate(self.patch_nums):
            z_BChw = F.interpolate(f_rest_BChw, size=(pn, pn), mode="area") if si != S - 1 else f_rest_BChw
            idx_Bl = self._nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)).reshape(B, pn * pn)
            h_BChw = self._up_phi(self.embed_map(idx_Bl, pn), si)
            f_hat_BChw = f_hat_BChw + h_BChw
            f_rest_BChw = f_rest_BChw - h_BChw
            idx_per_scale.append(idx_Bl)
            fhat_per_scale.append(f_hat_BChw)
        return idx_per_scale, fhat_per_scale

    # ------------------------------------------------------------------------------------------- public API
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: (f_hat with a straight-through gradient to f, VQ loss averaged over scales).

        Per scale the loss is beta·|sg(f_hat) - f|² (commitment, trains the encoder) + |f_hat - sg(f)|² (trains the
        codebook and φ), as in the official VQ-VAE training. The codebook usage statistic is not updated here.
        """
        f_BChw = f_BChw.float()
        # The loop detaches f itself, so gradients reach only the code lookups and φ (argmin has none).
        _, fhat_per_scale = self._residual_quantize(f_BChw)
        loss = f_BChw.new_zeros(())
        for f_hat_BChw in fhat_per_scale:
            loss = loss + self.beta * F.mse_loss(f_hat_BChw.detach(), f_BChw) + F.mse_loss(f_hat_BChw, f_BChw.detach())
        f_hat_ste_BChw = f_BChw + (fhat_per_scale[-1] - f_BChw).detach()
        return f_hat_ste_BChw, loss / len(self.patch_nums)

    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        """Per scale: LongTensor indices (B, pn²) in row-major order, or (to_fhat) the cumulative f_hat (B, C, H, W)."""
        idx_per_scale, fhat_per_scale = self._residual_quantize(f_BChw)
        return fhat_per_scale if to_fhat else idx_per_scale

    def embed_to_fhat(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Cumulative f_hat from per-scale code maps (B, C, pn, pn): the list over scales, or only the last.

        `all_to_max_scale=False` (upsample f_hat progressively scale by scale) is the official experimental path;
        neither training nor inference uses it.
        """
        B = ms_h_BChw[0].shape[0]
        outs: list[torch.Tensor] = []
        if all_to_max_scale:
            side = self.patch_nums[-1]
            f_hat_BChw = ms_h_BChw[0].new_zeros(B, self.Cvae, side, side, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                f_hat_BChw = f_hat_BChw + self._up_phi(h_BChw, si)
                outs.append(f_hat_BChw)
        else:
            pn0 = self.patch_nums[0]
            f_hat_BChw = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, (pn, h_BChw) in enumerate(zip(self.patch_nums, ms_h_BChw)):
                f_hat_BChw = F.interpolate(f_hat_BChw, size=(pn, pn), mode="bicubic") + self.quant_resi[si](h_BChw)
                outs.append(f_hat_BChw)
        return outs[-1] if last_one else outs

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing VAR input (B, L - patch_nums[0]², Cvae), float32.

        For scales 0..S-2, f_hat is accumulated as in encoding and then area-downsampled to the *next* scale's side;
        the flattened (row-major) maps are concatenated. The first scale's tokens come from the class embedding in
        VAR, so they have no entry here.
        """
        B = gt_ms_idx_Bl[0].shape[0]
        side = self.patch_nums[-1]
        f_hat_BChw = torch.zeros(B, self.Cvae, side, side, device=gt_ms_idx_Bl[0].device, dtype=torch.float32)
        next_inputs: list[torch.Tensor] = [f_hat_BChw.new_zeros(B, 0, self.Cvae)]
        for si in range(len(self.patch_nums) - 1):
            f_hat_BChw = f_hat_BChw + self._up_phi(self.embed_map(gt_ms_idx_Bl[si], self.patch_nums[si]), si)
            pn_next = self.patch_nums[si + 1]
            next_BChw = F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area")
            next_inputs.append(next_BChw.flatten(2).transpose(1, 2))
        return torch.cat(next_inputs, dim=1)

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One AR step: add scale si's code map h (B, C, pn, pn) to f_hat, return (f_hat, next scale's input).

        The next input is f_hat area-downsampled to patch_nums[si+1] (B, C, pn', pn'); at the last scale it is f_hat
        itself. Unlike the official code, f_hat is not modified in place: use the returned tensor.
        """
        if SN != len(self.patch_nums):
            raise ValueError(f"SN={SN} but the quantizer has {len(self.patch_nums)} scales")
        f_hat = f_hat + self._up_phi(h_BChw, si)
        if si == SN - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
