"""Finding and loading checkpoints safely: tensors only (safetensors or ``torch.load(weights_only=True)``).

Every failure names the file, what was expected and the config key that fixes it, before any work is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


def official_filenames(depth: int) -> tuple[str, str]:
    return f"var_d{depth}.pth", "vae_ch160v4096z32.pth"


def resolve_checkpoint(
    explicit: str | None, ckpt_dir: str | None, filename: str, hub_repo: str | None, config_key: str
) -> Path:
    """An explicit path must exist; otherwise look in ``ckpt_dir``, then try the hub (needs a network)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint file not found: {path} (set by {config_key}); point {config_key} at an existing "
                f"{filename} or leave it empty to use model.ckpt_dir / the hub"
            )
        return path
    tried = []
    if ckpt_dir:
        path = Path(ckpt_dir).expanduser() / filename
        if path.is_file():
            return path
        tried.append(str(path))
    if hub_repo:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=hub_repo, filename=filename))
        except Exception as err:  # offline, missing package, missing file: all end in the same advice
            tried.append(f"hub {hub_repo}/{filename} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    raise CheckpointError(
        f"cannot find {filename}; tried: {'; '.join(tried) or 'nothing (no ckpt_dir, no hub_repo)'}. "
        f"Download it and set {config_key}=/path/to/{filename} or model.ckpt_dir=/folder/with/checkpoints"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: a pickle that needs arbitrary objects is refused instead of executed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors (got {type(state).__name__})")
    return dict(state)


def _preview(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, config_key: str) -> None:
    """Strict load with a readable error: missing/unexpected keys and shape mismatches, plus the key to set."""
    if any("ada_gss" in k or k.startswith("shared_ada_lin.1") for k in state):
        raise CheckpointError(
            f"{path} uses shared AdaLN (the 512-px VAR-d36 layout), which varq does not support; "
            f"set {config_key} to a 256-px checkpoint (var_d16/20/24/30.pth)"
        )
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"checkpoint {path} does not match {type(module).__name__} (set by {config_key})"]
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches: {_preview(wrong_shape, 4)}")
        parts.append("check that the model config (depth, vocabulary, patch_nums) matches the file")
        raise CheckpointError("; ".join(parts))
    check_finite(state, {name for name, _ in module.named_parameters()}, path, config_key)
    module.load_state_dict(state, strict=True)


def check_finite(state: Mapping[str, torch.Tensor], parameters: set[str], path: Path, config_key: str) -> None:
    """NaN/Inf weights would only show up as garbage samples an hour later: refuse them at load, naming the key.
    Buffers may hold -inf on purpose (the block-causal attention mask), so only NaN is refused there."""
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor) if key in parameters else torch.isnan(tensor)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            raise CheckpointError(
                f"checkpoint {path} (set by {config_key}) holds {n_bad} NaN/Inf value(s) in tensor {key!r}; "
                "the file is damaged or was saved from a diverged model: re-download or re-export it")
