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
from varq.models.checkpoint import CheckpointError, check_finite, read_state_dict
from varq.models.infinity import Infinity

__all__ = [
    "DERIVED_BUFFERS", "prepare_state_dict", "load_infinity", "load_bsq_vae", "read_infinity_state", "read_vae_state",
]

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
        elif old.shape[0] < new.shape[0] and new.is_meta:
            raise CheckpointError(
                f"cfg_uncond has {old.shape[0]} rows, fewer than text_maxlen={new.shape[0]}: build the model on a real "
                "device (its initial rows fill the rest) or set a text_maxlen the checkpoint covers"
            )
        elif old.shape[0] < new.shape[0]:
            # the official loader keeps the model's own initial rows beyond the checkpoint's
            log.warning("Infinity checkpoint: cfg_uncond padded from %d to %d rows with the model's initial rows",
                        old.shape[0], new.shape[0])
            out["cfg_uncond"] = torch.cat((old.to(new.dtype), new[old.shape[0]:].to(old.device)))
    return out


def _strict_load(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path, config_key: str, hint: str) -> None:
    """Keys, shapes and finiteness checked with a readable error naming the file and the key to set, then loaded."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"checkpoint {path} (set by {config_key}) does not match {type(module).__name__}"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong)):
            if items:
                parts.append(f"{label} {items[:5]}{' …' if len(items) > 5 else ''}")
        raise CheckpointError("; ".join(parts + [hint]))
    check_finite(state, {name for name, _ in module.named_parameters()}, Path(path), config_key)
    # assign: a model built on the meta device takes the file's tensors without a second copy in memory
    meta = any(t.is_meta for t in expected.values())
    module.load_state_dict(state, strict=True, assign=meta)


def load_infinity(model: Infinity, state: Mapping[str, torch.Tensor], path: Path | str, config_key: str) -> Infinity:
    """Load strictly after `prepare_state_dict`; a mismatch is a `CheckpointError` naming the keys and the config key."""
    _strict_load(model, prepare_state_dict(model, state), path, config_key,
                 "check the model size (infinity_2b / infinity_125m / infinity_8b) against the file")
    return model


def load_bsq_vae(vae: BSQVAE, state: Mapping[str, torch.Tensor], path: Path | str, config_key: str) -> BSQVAE:
    """Load the tokenizer strictly; ``infinity_vae_d32reg.pth`` keeps its weights under ``"vae"``."""
    if "vae" in state and isinstance(state["vae"], Mapping):
        state = state["vae"]
    _strict_load(vae, state, path, config_key,
                 f"point {config_key} at the {vae.codebook_dim}-bit tokenizer (infinity_vae_d32reg.pth for d = 32)")
    return vae


def read_infinity_state(path: Path | str, config_key: str) -> dict[str, torch.Tensor]:
    """A transformer checkpoint: one file (``.pth`` / ``.safetensors``) or a folder of safetensors shards (8B)."""
    path = Path(path).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path} (set by {config_key}) holds no *.safetensors shards")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            part = read_state_dict(shard)
            clash = sorted(set(part) & set(state))
            if clash:
                raise CheckpointError(f"shard {shard} repeats keys {clash[:3]} of an earlier shard (set by {config_key})")
            state.update(part)
        return state
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path} (set by {config_key}); point {config_key} at it")
    return read_state_dict(path)


def read_vae_state(path: Path | str, config_key: str) -> dict[str, torch.Tensor]:
    """The tokenizer file: tensors under ``"vae"`` (``torch.load(weights_only=True)``) or a flat state dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"tokenizer file not found: {path} (set by {config_key}); point {config_key} at it")
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if isinstance(state, Mapping) and isinstance(state.get("vae"), Mapping):
        state = state["vae"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is neither a state dict of tensors nor one under 'vae' (set by {config_key})")
    return dict(state)
