"""KV-cached, scale-by-scale sampling of VAR with classifier-free guidance (the official inference semantics)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from varq.models.lookup import adapter_for
from varq.models.var import VAR
from varq.sample.filtering import gumbel_softmax, sample_top_k_top_p_

# on_logits(si, logits_2BlV): both CFG halves before mixing; override_idx(si, idx_Bl) -> idx_Bl (teacher forcing,
# in/out-painting). Both are optional observation/intervention points used by tests, calibration and edit tasks.
LogitsHook = Callable[[int, torch.Tensor], None]
IdxHook = Callable[[int, torch.Tensor], torch.Tensor]


def cfg_mix(logits_2BlV: torch.Tensor, cfg: float, si: int, num_scales: int) -> torch.Tensor:
    """(1+t)·cond − t·uncond with t = cfg·si/(S−1): guidance ramps from 0 at the first scale to cfg at the last."""
    B = logits_2BlV.shape[0] // 2
    t = cfg * si / (num_scales - 1)
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def generate(
    var: VAR,
    vqvae: torch.nn.Module,
    label_B: torch.Tensor,
    *,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    rng: torch.Generator | None = None,
    more_smooth: bool = False,
    autocast_dtype: torch.dtype | None = None,
    on_logits: LogitsHook | None = None,
    override_idx: IdxHook | None = None,
    reference_loop: bool = False,
) -> torch.Tensor:
    """Sample images for ``label_B`` (B,) (class ids; ``var.num_classes`` is the null class) → (B, 3, H, W) in [0, 1].

    The random stream is consumed like the official ``autoregressive_infer_cfg`` (one multinomial per scale over
    all rows; with ``more_smooth`` the discarded index draw comes first, then the Gumbel noise).

    The model runs through its adapter's KV-cached steps (`varq.models.adapter.KVSession`). By default the KV cache
    is preallocated and the AdaLN modulations are computed once per batch (when nothing observes them);
    ``reference_loop=True`` runs the plain loop instead (cache grown by ``cat``, every
    ``ada_lin`` at every scale). Both compute the same values in the same order, so their outputs are identical.
    """
    adapter = adapter_for(var)
    device = adapter.token_scale_L.device
    label_B = label_B.to(device)
    B, S = label_B.shape[0], adapter.num_scales
    quantizer = vqvae.quantize
    label_2B = torch.cat((label_B, torch.full_like(label_B, var.num_classes)))
    pn_last = var.patch_nums[-1]
    f_hat = torch.zeros(B, var.Cvae, pn_last, pn_last, device=device)
    with autocast_context(device, autocast_dtype), adapter.kv_session(
        label_2B, num_cond=B, static_modulation=not reference_loop, preallocate=not reference_loop,
    ) as session:
        x_2BlC = session.first_input()
        for si, pn in enumerate(var.patch_nums):
            logits_2BlV = session.step(si, x_2BlC)
            if not torch.isfinite(logits_2BlV).all():
                raise FloatingPointError(f"non-finite logits at scale {si} (patch {pn}x{pn}): check the model/quantizer")
            if on_logits is not None:
                on_logits(si, logits_2BlV)
            logits_BlV = cfg_mix(logits_2BlV, cfg, si, S)
            idx_Bl = sample_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, rng=rng)
            if override_idx is not None:
                idx_Bl = override_idx(si, idx_Bl)
            if more_smooth:  # visualisation only (README of VAR: not for FID/IS)
                ratio = si / (S - 1)
                tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
                soft_BlV = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, rng)
                h_BlCv = soft_BlV @ quantizer.embedding.weight.unsqueeze(0)
            else:
                h_BlCv = quantizer.embedding(idx_Bl)
            h_BCvhw = h_BlCv.transpose(1, 2).reshape(B, var.Cvae, pn, pn).float()
            f_hat, next_BCvhw = quantizer.get_next_autoregressive_input(si, S, f_hat, h_BCvhw)
            if si < S - 1:
                x_2BlC = session.embed(si + 1, next_BCvhw.flatten(2).transpose(1, 2)).repeat(2, 1, 1)
        img_B3HW = vqvae.fhat_to_img(f_hat.float())
    return img_B3HW.float().add(1).mul(0.5)
