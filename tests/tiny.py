"""The tiny VAR / VQ-VAE pair of the quantization and calibration tests (CPU, milliseconds per pass)."""

from __future__ import annotations

import torch

from varq.models.build import build_var, build_vqvae
from varq.models.factory import strong_random_init_

PATCH_NUMS = (1, 2, 4)
NUM_CLASSES = 10


def tiny_var(seed: int = 0):
    var = build_var(2, vocab_size=32, Cvae=8, num_classes=NUM_CLASSES, width=64, num_heads=1, patch_nums=PATCH_NUMS)
    var.cond_drop_rate = 0.0
    return strong_random_init_(var, seed=seed).eval()


def tiny_vqvae():
    vqvae = build_vqvae(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=PATCH_NUMS)
    return vqvae.eval()


def random_teacher_batch(vqvae, B: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(label_B, x_BLCv, idx per scale) for teacher forcing, from random tokens."""
    gen = torch.Generator().manual_seed(seed)
    idx = [torch.randint(32, (B, pn * pn), generator=gen) for pn in PATCH_NUMS]
    label_B = torch.randint(NUM_CLASSES, (B,), generator=gen)
    with torch.no_grad():
        return label_B, vqvae.idxBl_to_var_input(idx), idx
