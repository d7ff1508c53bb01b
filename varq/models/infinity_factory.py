"""Build the (Infinity, BSQ tokenizer) pair of a named size, with released weights or random ones."""

from __future__ import annotations

import torch

from varq.models.bsq_vae import BSQVAE, build_bsq_vae
from varq.models.checkpoint import CheckpointError
from varq.models.infinity import INFINITY_ARCHS, Infinity, build_infinity
from varq.models.infinity_checkpoint import load_bsq_vae, load_infinity, read_infinity_state, read_vae_state
from varq.models.infinity_scales import ScaleSchedule
from varq.models.random_init import strong_random_init_

__all__ = ["SOURCES", "build_infinity_models"]

SOURCES = ("official", "random")


def build_infinity_models(
    name: str, *, source: str = "random", ckpt: str | None = None, vae_ckpt: str | None = None,
    schedule: ScaleSchedule | None = None, device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[Infinity, BSQVAE]:
    """FP models in eval mode on ``device``.

    ``official``: ``ckpt`` (``infinity_2b_reg.pth``, or a folder of safetensors shards) and ``vae_ckpt``
    (``infinity_vae_d32reg.pth``), loaded strictly; the transformer is built on the meta device and takes the file's
    tensors, so loading the 2B model holds one copy of its 8.8 GB. ``random``: weights that make every block matter.
    File problems raise `CheckpointError` naming ``model.ckpt`` / ``model.vae_ckpt`` before anything is built.
    """
    if source not in SOURCES:
        raise CheckpointError(f"model.source={source!r} is not one of {', '.join(SOURCES)}")
    if name not in INFINITY_ARCHS:
        raise CheckpointError(f"model {name!r} is not one of {', '.join(INFINITY_ARCHS)}")
    codebook_dim = INFINITY_ARCHS[name].codebook_dim
    if source == "random":
        model = strong_random_init_(build_infinity(name, schedule, seed=seed), seed=seed)
        vae = build_bsq_vae(codebook_dim, seed=seed)
    else:
        for value, key in ((ckpt, "model.ckpt"), (vae_ckpt, "model.vae_ckpt")):
            if not value:
                raise CheckpointError(f"model.source=official needs {key}=/path/to/the released file")
        state = read_infinity_state(ckpt, "model.ckpt")
        vae_state = read_vae_state(vae_ckpt, "model.vae_ckpt")
        with torch.device("meta"):
            model = build_infinity(name, schedule, seed=seed)
        load_infinity(model, state, ckpt, "model.ckpt")
        model.set_schedule(model.schedule)  # the derived buffers were built on the meta device
        vae = load_bsq_vae(build_bsq_vae(codebook_dim, seed=seed), vae_state, vae_ckpt, "model.vae_ckpt")
    return model.eval().to(device), vae.eval().to(device)
