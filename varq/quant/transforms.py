"""Per-channel input transforms folded exactly into an AdaLN modulation (methods.md §4.4–4.5).

The Linears fed directly by an AdaLN modulation (the model adapter's ``adaln_sites``; in VAR mat_qkv, fc1 and the
head) see X = LN(x)·(1 + scale) + shift with (scale, shift) rows of the modulating Linear's output. A per-channel
transform of that input

    X̃ = X / s − δ,    W̃ = W·diag(s),    b̃ = b + W̃·δ

leaves W̃X̃ + b̃ = WX + b, and is folded with no runtime op: the scale rows of the modulating Linear are divided by
s and their bias becomes (1 + b)/s − 1 (the "1+" constant of the modulation turns into 1/s without touching the
model code), the shift rows become (shift − s·δ)/s. A consumer without a bias of its own gets its compensation in
the tensors the site names (VAR's mat_qkv: ``q_bias``, the persistent ``zero_k_bias`` buffer and ``v_bias``).

SmoothQuant (α = 0.5), the OS+-style symmetric shift and GPS only differ in how (s, δ) are chosen; the choosers
here are pure functions on statistics, so tests can check them against their definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from varq.models.adapter import AdaLNSite
from varq.models.lookup import adapter_for
from varq.quant.primitives import EPS, fake_quantize_affine, qparams_minmax

__all__ = [
    "AdaLNSite",
    "adaln_sites",
    "fold_channel_transform",
    "smoothquant_scales",
    "symmetric_shift",
    "GPSStats",
    "gps_objective",
    "gps_scales",
    "gps_batch_scales",
]


def adaln_sites(var: nn.Module) -> dict[str, AdaLNSite]:
    """Every AdaLN-fed Linear of ``var`` by FQN, in forward order (declared by the model adapter)."""
    return adapter_for(var).adaln_sites()


def _rows(chunk: int, C: int) -> slice:
    return slice(chunk * C, (chunk + 1) * C)


@torch.no_grad()
def fold_channel_transform(
    var: nn.Module, site: AdaLNSite, scale_C: torch.Tensor, shift_C: torch.Tensor | None = None
) -> None:
    """Fold X̃ = X/s − δ into ``site``'s AdaLN and W̃ = W·diag(s), b̃ = b + W̃δ into its consumer, in place.

    Works on plain and quantized Linears alike (both hold ``weight``/``bias``); weight quantizers that observed the
    old weights must be refitted by the caller.
    """
    consumer, ada = var.get_submodule(site.fqn), var.get_submodule(site.ada_lin_fqn)
    C = consumer.weight.shape[1]
    s_C = scale_C.to(consumer.weight)
    if not bool(torch.isfinite(s_C).all()) or bool((s_C <= 0).any()):
        raise ValueError(f"{site.fqn}: channel scales must be finite and positive")
    sc, sh = _rows(site.scale_chunk, C), _rows(site.shift_chunk, C)
    ada.weight[sc] /= s_C[:, None]
    ada.bias[sc] = (1 + ada.bias[sc]) / s_C - 1
    ada.weight[sh] /= s_C[:, None]
    delta_C = None if shift_C is None else shift_C.to(consumer.weight)
    if delta_C is None:
        ada.bias[sh] /= s_C
    else:
        ada.bias[sh] = (ada.bias[sh] - s_C * delta_C) / s_C
    consumer.weight.mul_(s_C)
    if delta_C is None:
        return
    comp_O = consumer.weight @ delta_C
    if not site.bias_fqns:
        consumer.bias.add_(comp_O)
        return
    # a consumer without a bias of its own (VAR's mat_qkv): its output bias is the concatenation of these tensors,
    # applied right after the projection
    for fqn, comp_part in zip(site.bias_fqns, comp_O.chunk(len(site.bias_fqns)), strict=True):
        owner_fqn, _, name = fqn.rpartition(".")
        getattr(var.get_submodule(owner_fqn), name).add_(comp_part)


# -------------------------------------------------------------------- choosers
def smoothquant_scales(
    act_absmax_C: torch.Tensor, weight_OC: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^α / max|W_:,j|^(1−α), guarded against empty channels (s = 1 there)."""
    w_absmax_C = weight_OC.detach().abs().amax(dim=0).float()
    a = act_absmax_C.float()
    s_C = a.clamp_min(eps).pow(alpha) / w_absmax_C.clamp_min(eps).pow(1 - alpha)
    dead = (a <= eps) | (w_absmax_C <= eps)
    return torch.where(dead, torch.ones_like(s_C), s_C)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, fractional: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not fractional:
        return qparams_minmax(lo, hi, bits)
    # a range stored by an ``ema_qparams`` quantizer is [−z·Δ, (2^b − 1 − z)·Δ] with z left fractional
    step = ((hi.float() - lo.float()) / (2**bits - 1)).clamp_min(EPS)
    return step, -lo.float() / step


def symmetric_shift(lo_C: torch.Tensor, hi_C: torch.Tensor, bits: int, fractional_zero_point: bool = False) -> torch.Tensor:
    """OS+-style shift δ_c = Δ_c·(2^(b−1) − 1 − z_c) from a per-channel quantizer's range: after X − δ the range
    runs from −(2^(b−1) − 1)·Δ_c, i.e. it is centred on zero. ``fractional_zero_point``: z_c = −lo_c/Δ_c unrounded
    (the released code shifts by its EMA'd, fractional zero point)."""
    delta_C, zero_C = _qparams(lo_C, hi_C, bits, fractional_zero_point)
    return delta_C * (2 ** (bits - 1) - 1 - zero_C)


@dataclass
class GPSStats:
    """Per-channel sums of GPS's objective terms over calibration tokens (methods.md §4.5, step 3).

    ``err_x_C`` = Σ‖X_:,j − Q^(o)(X_:,j)‖², ``norm_x_C`` = Σ‖X_:,j‖² with Q^(o) the outlier channel's quantizer.
    Summing over batches evaluates the objective on the whole calibration set (``statistics: fp``); the released
    code fills one per batch and averages the per-batch scales with an EMA (``statistics: released``).
    """

    err_x_C: torch.Tensor
    norm_x_C: torch.Tensor

    @classmethod
    def zeros(cls, C: int, device: torch.device | str = "cpu") -> GPSStats:
        return cls(torch.zeros(C, device=device), torch.zeros(C, device=device))

    @torch.no_grad()
    def add(
        self, x_NC: torch.Tensor, outlier_lo: torch.Tensor, outlier_hi: torch.Tensor, bits: int,
        fractional_zero_point: bool = False,
    ) -> None:
        x = x_NC.detach().reshape(-1, x_NC.shape[-1]).float()
        step, zero = _qparams(outlier_lo, outlier_hi, bits, fractional_zero_point)
        xq = fake_quantize_affine(x, step, zero, bits)
        self.err_x_C += (x - xq).pow(2).sum(dim=0)
        self.norm_x_C += x.pow(2).sum(dim=0)


def gps_objective(
    s: torch.Tensor, s_o: torch.Tensor, err_x: torch.Tensor, norm_x: torch.Tensor, err_w: torch.Tensor,
    norm_w: torch.Tensor,
) -> torch.Tensor:
    """ℓ_j(s) = (s²/s_o²)·E_X,j·N_W,j + (s_o²/s²)·N_X,j·E_W,j (diagonal-Hessian layer-output error of channel j)."""
    return (s**2 / s_o**2) * err_x * norm_w + (s_o**2 / s**2) * norm_x * err_w


@torch.no_grad()
def gps_scales(
    range_x_C: torch.Tensor, weight_OC: torch.Tensor, weight_hat_OC: torch.Tensor, stats: GPSStats,
) -> tuple[torch.Tensor, int]:
    """GPS closed form (methods.md §4.5): the channel scales s and the outlier (anchor) channel o.

    ``range_x_C``: each input channel's range r_j (max − min); ``weight_hat_OC``: Q_w(W), the current
    per-output-channel weight quantizer's output. The outlier o = argmax r gets SmoothQuant's s_o = √(r_o/ρ_o)
    (ρ_o: its weight column range); every other channel minimises `gps_objective`,
    s_j = s_o·(N_X,j·E_W,j / (E_X,j·N_W,j))^(1/4), with s_j = 1 where E_X,j·N_W,j = 0.
    """
    w, w_hat = weight_OC.detach().float(), weight_hat_OC.detach().float()
    r_C = range_x_C.float()
    o = int(torch.argmax(r_C))
    rho_o = (w[:, o].max() - w[:, o].min()).clamp_min(1e-8)
    s_o = (r_C[o].clamp_min(1e-8) / rho_o).sqrt()
    err_w_C = (w - w_hat).pow(2).sum(dim=0)
    norm_w_C = w_hat.pow(2).sum(dim=0)
    denom_C = stats.err_x_C * norm_w_C
    numer_C = stats.norm_x_C * err_w_C
    safe = (denom_C > 0) & (numer_C > 0)
    ratio_C = torch.where(safe, numer_C / torch.where(safe, denom_C, torch.ones_like(denom_C)), torch.ones_like(r_C))
    s_C = torch.where(safe, s_o * ratio_C.pow(0.25), torch.ones_like(r_C))
    s_C[o] = s_o
    return s_C, o


@torch.no_grad()
def gps_batch_scales(
    x_NC: torch.Tensor, weight_OC: torch.Tensor, weight_hat_OC: torch.Tensor, lo_C: torch.Tensor, hi_C: torch.Tensor,
    bits: int,
) -> tuple[torch.Tensor, int]:
    """GPS on one calibration batch, as released: the channel ranges r_j and the outlier o come from this batch's
    min/max (not from a searched range); E_X uses channel o's (Δ, z) of the per-channel input quantizer, whose range
    [lo_C, hi_C] holds a fractional zero point. The released code averages these per-batch scales with an EMA."""
    x = x_NC.detach().reshape(-1, x_NC.shape[-1]).float()
    range_C = x.amax(dim=0) - x.amin(dim=0)
    o = int(torch.argmax(range_C))
    stats = GPSStats.zeros(range_C.numel(), range_C.device)
    stats.add(x, lo_C[o], hi_C[o], bits, fractional_zero_point=True)
    return gps_scales(range_C, weight_OC, weight_hat_OC, stats)
