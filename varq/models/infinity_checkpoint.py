"""Loading Infinity checkpoints strictly: what the official loader trims silently is done here explicitly and logged.

``infinity_2b_reg.pth`` is a flat state dict (``torch.load(weights_only=True)``). The official loader loads with
``strict=False``, drops the mask buffers it rebuilds at start-up, and trims or pads ``cfg_uncond`` to the model's
``text_maxlen``; varq does the same three things in the open, then loads with ``strict=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from varq.models.bsq_vae import BSQVAE
from varq.models.checkpoint import CheckpointError
from varq.models.infinity import Infinity

__all__ = ["DERIVED_BUFFERS", "prepare_state_dict", "load_infinity", "load_bsq_vae"]

log = logging.getLogger(__name__)

# buffers a checkpoint may carry that the model derives from its scale schedule instead
DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def prepare_state_dict(model: Infinity, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` the model loads strictly: derived buffers dropped, ``cfg_uncond`` fitted to text_maxlen."""
    out = dict(state)
    dropped = [name for name in DERIVED_BUFFERS if out.pop(name, None) is not None]
    if dropped:
        log.info("Infinity checkpoint: dropped derived buffers %s (rebuilt from the scale schedule)", dropped)
    if "cfg_uncond" in out:
        old, new = out["cfg_uncond"], model.cfg_uncond.detach()
        if old.shape[1:] != new.shape[1:]:
            raise CheckpointError(
                f"cfg_uncond has shape {tuple(old.shape)}; the model expects (*, {new.shape[1]}): the checkpoint's text "
                "width differs from the model config's text_channels"
            )
        if old.shape[0] > new.shape[0]:
            log.warning("Infinity checkpoint: cfg_uncond trimmed from %d to %d rows (text_maxlen)", old.shape[0], new.shape[0])
            out["cfg_uncond"] = old[: new.shape[0]]
        elif old.shape[0] < new.shape[0]:
            # the official loader keeps the model's own initial rows beyond the checkpoint's
            log.warning("Infinity checkpoint: cfg_uncond padded from %d to %d rows with the model's initial rows",
                        old.shape[0], new.shape[0])
            out["cfg_uncond"] = torch.cat((old.to(new.dtype), new[old.shape[0]:].to(old.device)))
    return out


def load_infinity(model: Infinity, state: Mapping[str, torch.Tensor], path: Path | str, config_key: str) -> Infinity:
    """Load strictly; a key mismatch is a `CheckpointError` naming the file, the keys and the config key to fix."""
    prepared = prepare_state_dict(model, state)
    expected, got = set(model.state_dict()), set(prepared)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the Infinity layout of this config: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; "
            f"check {config_key} and the model size (infinity_2b / infinity_125m / infinity_8b)"
        )
    model.load_state_dict(prepared, strict=True)
    return model


def load_bsq_vae(vae: BSQVAE, state: Mapping[str, torch.Tensor], path: Path | str, config_key: str) -> BSQVAE:
    """Load the tokenizer strictly; ``infinity_vae_d32reg.pth`` keeps its weights under ``"vae"``."""
    if "vae" in state and isinstance(state["vae"], Mapping):
        state = state["vae"]
    expected, got = set(vae.state_dict()), set(state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the BSQ tokenizer layout (d={vae.codebook_dim}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; point {config_key} at infinity_vae_d32reg.pth (a 32-bit tokenizer)"
        )
    vae.load_state_dict(state, strict=True)
    return vae
