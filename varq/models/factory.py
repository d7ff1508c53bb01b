"""Build the (VAR, VQ-VAE) pair a run config names, with weights from checkpoints, shipped assets or random."""

from __future__ import annotations

from pathlib import Path

import torch

from varq.config import ModelConfig
from varq.models.build import build_var, build_vqvae
from varq.models.checkpoint import (
    CheckpointError,
    load_checked,
    official_filenames,
    read_state_dict,
    resolve_checkpoint,
)
from varq.models.random_init import strong_random_init_
from varq.models.var import VAR

DIGITS_ASSETS = ("digits_var", "digits_vqvae")


def var_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vae.vocab_size, Cvae=cfg.vae.z_channels, num_classes=cfg.num_classes,
        width=cfg.width or 64 * cfg.depth, num_heads=cfg.num_heads or cfg.depth, patch_nums=tuple(cfg.patch_nums),
    )


def vqvae_kwargs(cfg: ModelConfig) -> dict:
    v = cfg.vae
    return dict(
        vocab_size=v.vocab_size, z_channels=v.z_channels, ch=v.ch, ch_mult=tuple(v.ch_mult),
        num_res_blocks=v.num_res_blocks, quant_resi=v.quant_resi, share_quant_resi=v.share_quant_resi,
        patch_nums=tuple(cfg.patch_nums),
    )


def resolve_official_paths(cfg: ModelConfig) -> tuple[Path, Path]:
    """Locate both official files before anything is built, so a wrong path fails in seconds."""
    var_name, vae_name = official_filenames(cfg.depth)
    var_path = resolve_checkpoint(cfg.ckpt, cfg.ckpt_dir, var_name, cfg.hub_repo, "model.ckpt")
    vae_path = resolve_checkpoint(cfg.vae_ckpt, cfg.ckpt_dir, vae_name, cfg.hub_repo, "model.vae_ckpt")
    return var_path, vae_path


def build_models(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[VAR, torch.nn.Module]:
    """FP models in eval mode on ``device``; checkpoint problems raise ``CheckpointError`` naming the key."""
    if cfg.family == "infinity":
        from varq.models.infinity_factory import build_infinity_models

        model, vae = build_infinity_models(cfg.name, source=cfg.source, ckpt=cfg.ckpt, vae_ckpt=cfg.vae_ckpt,
                                           device=device)
        model.attn_query_chunk = cfg.attn_query_chunk  # read by varq.quant.model.quantize_var
        return model, vae
    if cfg.family != "var":
        raise CheckpointError(f"model.family={cfg.family!r} is not one of var, infinity")
    if cfg.source == "official":
        var_path, vae_path = resolve_official_paths(cfg)
        var, vqvae = build_var(cfg.depth, **var_kwargs(cfg)), build_vqvae(**vqvae_kwargs(cfg))
        load_checked(var, read_state_dict(var_path), var_path, "model.ckpt")
        load_checked(vqvae, read_state_dict(vae_path), vae_path, "model.vae_ckpt")
    elif cfg.source == "asset":
        from varq.models.assets import load_asset

        var, vqvae = build_var(cfg.depth, **var_kwargs(cfg)), build_vqvae(**vqvae_kwargs(cfg))
        for module, name in zip((var, vqvae), DIGITS_ASSETS):
            state, _meta = load_asset(name)
            load_checked(module, state, Path(f"varq/assets/{name}.safetensors"), "model (asset)")
    elif cfg.source == "random":
        var = strong_random_init_(build_var(cfg.depth, **var_kwargs(cfg)), seed=0)
        vqvae = build_vqvae(**vqvae_kwargs(cfg))  # seeded default init, codebook N(0, 1)
    else:
        raise CheckpointError(f"model.source={cfg.source!r} is not one of official, asset, random")
    var.cond_drop_rate = 0.0
    var.attn_query_chunk = cfg.attn_query_chunk  # read by varq.quant.model.quantize_var
    return var.eval().to(device), vqvae.eval().to(device)
