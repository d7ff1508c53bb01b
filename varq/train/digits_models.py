"""Train the embedded default ``var_digits``: a multi-scale VQ-VAE and a VAR on scikit-learn's digits (CPU, minutes).

The same classes as VAR-d16 at a small size; the hyper-parameters come from ``varq/conf/model/var_digits.yaml`` so the
shipped weights and the config that loads them cannot drift apart. Everything is seeded; the result is saved as
checksummed safetensors assets (``digits_vqvae``, ``digits_var``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from varq.config import ModelConfig
from varq.data.digits import load_digits_split
from varq.data.images import to_model_range
from varq.models.build import build_var, build_vqvae
from varq.models.factory import var_kwargs, vqvae_kwargs
from varq.models.var import VAR

log = logging.getLogger(__name__)
CONF_PATH = Path(__file__).resolve().parents[1] / "conf" / "model" / "var_digits.yaml"


def digits_model_config() -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_PATH)))


def random_shift(x_B3HW: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background is -1 = black): cheap, label-preserving."""
    B = x_B3HW.shape[0]
    pad = F.pad(x_B3HW, (max_shift,) * 4, value=-1.0)
    H, W = x_B3HW.shape[-2:]
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    return torch.stack([pad[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def train_vqvae(cfg: ModelConfig, steps: int = 2500, batch_size: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images, _ = load_digits_split("train", image_size=cfg.image_size)
    x_N3HW = to_model_range(images)
    vqvae = build_vqvae(seed=seed, **vqvae_kwargs(cfg)).train()
    vqvae.requires_grad_(True)
    quantizer = vqvae.quantize
    with torch.no_grad():  # small codes so the first residuals find distinct neighbours
        quantizer.embedding.weight.uniform_(-1.0 / quantizer.vocab_size, 1.0 / quantizer.vocab_size, generator=gen)
    opt = torch.optim.AdamW(vqvae.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    usage_V = torch.zeros(quantizer.vocab_size)
    t0 = time.perf_counter()
    for step in range(steps):
        lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = random_shift(x_N3HW[torch.randint(0, len(x_N3HW), (batch_size,), generator=gen)], 1, gen)
        f_BChw = vqvae.img_to_f(batch)
        f_hat, vq_loss = quantizer(f_BChw)
        recon = vqvae.decoder(vqvae.post_quant_conv(f_hat))
        rec_loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for idx_Bl in quantizer.f_to_idxBl_or_fhat(f_BChw.detach(), to_fhat=False):
                usage_V += torch.bincount(idx_Bl.flatten(), minlength=quantizer.vocab_size)
            # Dead-code restart: codes nobody picked in the last window move onto random latent vectors, so the
            # small codebook is fully used (otherwise a few codes take everything and samples lose detail).
            if step % 100 == 99 and step < steps * 0.8:
                dead = (usage_V == 0).nonzero().flatten()
                if len(dead):
                    pool_NC = f_BChw.detach().permute(0, 2, 3, 1).reshape(-1, quantizer.Cvae)
                    pick = torch.randint(0, len(pool_NC), (len(dead),), generator=gen)
                    quantizer.embedding.weight[dead] = pool_NC[pick] * 0.5
                usage_V.zero_()
        if step % 500 == 0 or step == steps - 1:
            log.info("vqvae step %d/%d rec %.4f vq %.4f (%.0fs)", step, steps, rec_loss.item(), vq_loss.item(),
                     time.perf_counter() - t0)
    vqvae.eval().requires_grad_(False)
    return vqvae


@torch.no_grad()
def tokenize(vqvae, x_N3HW: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    chunks = [vqvae.img_to_idxBl(x_N3HW[i : i + batch_size]) for i in range(0, len(x_N3HW), batch_size)]
    return [torch.cat([c[si] for c in chunks]) for si in range(len(chunks[0]))]


def init_for_training_(var: VAR) -> VAR:
    """The official training init: small residual branches and an almost-silent head at step 0."""
    std = math.sqrt(1 / var.C / 3)
    with torch.no_grad():
        for m in var.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
        var.head.weight.mul_(0.02)
        var.head_nm.ada_lin[-1].weight.mul_(0.5)
        for block in var.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * var.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * var.depth))
            block.ada_lin[-1].weight[2 * var.C :].mul_(0.5)
            block.ada_lin[-1].weight[: 2 * var.C].mul_(1e-5)
    return var


def train_var(
    cfg: ModelConfig, vqvae, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3, augment_copies: int = 8, seed: int = 0
) -> VAR:
    gen = torch.Generator().manual_seed(seed + 1)
    images, labels = load_digits_split("train", image_size=cfg.image_size)
    x_N3HW = to_model_range(images)
    # shifted copies give the tokenizer's view of more digits than the 1.4k originals
    views = [x_N3HW] + [random_shift(x_N3HW, 2, gen) for _ in range(augment_copies - 1)]
    idx_per_scale = tokenize(vqvae, torch.cat(views))
    label_N = labels.repeat(augment_copies)
    x_in_NLCv = vqvae.idxBl_to_var_input(idx_per_scale)
    target_NL = torch.cat(idx_per_scale, dim=1)
    torch.manual_seed(seed)  # training-only randomness (label dropout); the caller is a training script
    var = init_for_training_(build_var(cfg.depth, **var_kwargs(cfg), drop_path_rate=0.0, cond_drop_rate=0.1)).train()
    opt = torch.optim.AdamW(var.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    t0 = time.perf_counter()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(0, len(label_N), (batch_size,), generator=gen)
        logits_BLV = var(label_N[pick], x_in_NLCv[pick])
        loss = F.cross_entropy(logits_BLV.reshape(-1, var.V), target_NL[pick].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("var step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.perf_counter() - t0)
    var.eval()
    var.cond_drop_rate = 0.0
    return var
