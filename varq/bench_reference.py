"""The official VAR sampler, loaded from a user's checkout of its code, with varq's weights (for `varq.bench`).

The official code is imported from ``--reference-repo`` at run time and never shipped with varq. Its models are
built with their constructors, not with ``build_vae_var``, which patches ``reset_parameters`` of every Linear,
Conv and norm process-wide (and would leave varq's own layers uninitialised later in the same process). Both
samplers then hold the same weights: varq's state dicts load strictly into the official modules.

The official VQ-VAE hard-codes the ImageNet layout (``ch_mult=(1, 1, 2, 2, 4)``, two residual blocks per level).
For any other VQ-VAE (the digits model) the official transformer runs on varq's VQ-VAE object, which offers the
same interface (``Cvae``, ``vocab_size``, ``quantize.embedding``, ``quantize.get_next_autoregressive_input``,
``fhat_to_img``); the result says which decoder ran.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ReferenceSampler", "load_reference"]

OFFICIAL_CH_MULT = (1, 1, 2, 2, 4)
OFFICIAL_RES_BLOCKS = 2


@dataclass
class ReferenceSampler:
    var: torch.nn.Module
    vqvae: torch.nn.Module
    vqvae_source: str  # "official" or "varq"

    def __call__(self, label_B: torch.Tensor, seed: int, cfg: float, top_k: int, top_p: float) -> torch.Tensor:
        return self.var.autoregressive_infer_cfg(
            label_B.shape[0], label_B, g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=False,
        )


def _check_repo(repo: Path) -> None:
    needed = [repo / "models" / "var.py", repo / "models" / "vqvae.py", repo / "dist.py"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(
            f"--reference-repo {repo}: not a checkout of the official VAR code (missing {', '.join(missing)}); "
            f"pass the directory that holds models/var.py (github.com/FoundationVision/VAR)"
        )


@contextlib.contextmanager
def _importable(repo: Path):
    # The official code imports its packages as top-level `models` and `dist`.
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))


def load_reference(repo: str | Path, var, vqvae, vae_cfg, device: torch.device) -> ReferenceSampler:
    """The official VAR (and VQ-VAE where its layout fits) holding the weights of varq's ``var`` and ``vqvae``.

    ``vae_cfg``: the model config's ``vae`` block (``VQVAEConfig``), which says whether the official VQ-VAE fits.
    """
    repo = Path(repo).expanduser().resolve()
    _check_repo(repo)
    with _importable(repo), contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its config
        official_var = importlib.import_module("models.var")
        official_vqvae = importlib.import_module("models.vqvae")
        if tuple(vae_cfg.ch_mult) == OFFICIAL_CH_MULT and vae_cfg.num_res_blocks == OFFICIAL_RES_BLOCKS:
            ref_vqvae = official_vqvae.VQVAE(
                vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels, ch=vae_cfg.ch, test_mode=True,
                share_quant_resi=vae_cfg.share_quant_resi, v_patch_nums=tuple(var.patch_nums),
                quant_resi=vae_cfg.quant_resi,
            )
            ref_vqvae.load_state_dict(vqvae.state_dict(), strict=True)
            source = "official"
        else:
            ref_vqvae, source = vqvae, "varq"
        ref_var = official_var.VAR(
            ref_vqvae, num_classes=var.num_classes, depth=var.depth, embed_dim=var.C, num_heads=var.num_heads,
            drop_path_rate=0.0, attn_l2_norm=var.blocks[0].attn.attn_l2_norm, patch_nums=tuple(var.patch_nums),
            flash_if_available=True, fused_if_available=True,
        )
    ref_var.load_state_dict(var.state_dict(), strict=True)
    ref_var.rng = torch.Generator(device=device)  # the official picks the device from CUDA availability
    return ReferenceSampler(ref_var.to(device).eval(), ref_vqvae.to(device).eval(), source)
