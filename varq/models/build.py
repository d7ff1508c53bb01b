"""Factories for the official VAR sizes and their VQ-VAE; other sizes pass their own hyper-parameters."""

from __future__ import annotations

from typing import Any

import torch

from varq.models.var import OFFICIAL_PATCH_NUMS, VAR

OFFICIAL_DEPTHS = (16, 20, 24, 30)


def official_var_kwargs(depth: int) -> dict[str, Any]:
    """Hyper-parameters of ``var_d{depth}.pth`` (width 64·d, d heads, drop-path 0.1·d/24, l2-normed attention)."""
    return dict(
        vocab_size=4096, Cvae=32, num_classes=1000, depth=depth, width=64 * depth, num_heads=depth,
        mlp_ratio=4.0, norm_eps=1e-6, drop_path_rate=0.1 * depth / 24, cond_drop_rate=0.1,
        attn_l2_norm=True, patch_nums=OFFICIAL_PATCH_NUMS,
    )


def build_var(depth: int = 16, seed: int = 0, **overrides: Any) -> VAR:
    """VAR with the official hyper-parameters for ``depth`` unless overridden; returned in eval mode.

    Building touches no global state: the initialisers draw from a forked RNG seeded with ``seed`` (so builds are
    deterministic and the caller's stream is untouched), and nothing is patched (the official factory disables
    ``reset_parameters`` process-wide, which leaves every later layer uninitialised).
    """
    kwargs = official_var_kwargs(depth)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        var = VAR(**kwargs)
    return var.eval()


def build_vqvae(**overrides: Any):
    from varq.models.vqvae import build_vqvae as _build

    return _build(**overrides)
