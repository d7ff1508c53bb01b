"""The shipped-weights store: ``varq/assets/<name>.safetensors`` plus one ``checksums.json`` {name: sha256}.

Every load verifies the file's sha256 against checksums.json before deserialising anything, so a truncated,
tampered or stale file is a clear error instead of silently different metrics. Writes are atomic (temporary
file, then rename) so an interrupted `make assets` never leaves a half-written asset behind a valid checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from varq.atomic import atomic_write_bytes

CHECKSUMS_FILE = "checksums.json"
_META_KEY = "varq_meta"  # safetensors metadata is str → str; varq's meta dict travels JSON-encoded under one key
_FIX_HINT = "Rebuild the shipped weights with `make assets`."


class AssetError(RuntimeError):
    """A shipped asset is missing, unregistered or does not match its recorded checksum."""


def default_assets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets"


def _resolve_dir(assets_dir: str | os.PathLike[str] | None) -> Path:
    return Path(assets_dir) if assets_dir is not None else default_assets_dir()


def asset_path(name: str, assets_dir: str | os.PathLike[str] | None = None) -> Path:
    return _resolve_dir(assets_dir) / f"{name}.safetensors"


def read_checksums(assets_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    path = _resolve_dir(assets_dir) / CHECKSUMS_FILE
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f))


def save_asset(
    name: str,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    assets_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `<name>.safetensors` atomically and record its sha256 in checksums.json; returns the file's path."""
    from filelock import FileLock
    from safetensors.torch import save

    directory = _resolve_dir(assets_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; clone so saving never depends on the caller's layout.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    payload = save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    path = asset_path(name, directory)
    # One lock around file + checksum update: `make assets` may train several assets in parallel processes.
    # The lock file lives in the temp dir, keyed by the assets folder, so the package folder stays clean.
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"varq-assets-{key}.lock")):
        atomic_write_bytes(path, payload)
        checksums = read_checksums(directory)
        checksums[name] = hashlib.sha256(payload).hexdigest()
        text = json.dumps(dict(sorted(checksums.items())), indent=2) + "\n"
        atomic_write_bytes(directory / CHECKSUMS_FILE, text.encode("utf-8"))
    return path


def _read_verified(name: str, assets_dir: str | os.PathLike[str] | None) -> tuple[Path, bytes]:
    # Hash and parse the same bytes: checking the file and then re-opening it would leave a window for a swap.
    directory = _resolve_dir(assets_dir)
    path = asset_path(name, directory)
    expected = read_checksums(directory).get(name)
    if not path.exists():
        raise AssetError(f"asset {name!r} is missing: {path} does not exist (expected sha256 {expected}). {_FIX_HINT}")
    if expected is None:
        raise AssetError(f"asset {name!r} has no entry in {directory / CHECKSUMS_FILE}, so {path} cannot be "
                         f"verified. {_FIX_HINT}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise AssetError(f"asset {name!r} does not match its checksum: {path} has sha256 {actual}, expected "
                         f"{expected} (from {directory / CHECKSUMS_FILE}). {_FIX_HINT}")
    return path, data


def verify_asset(name: str, assets_dir: str | os.PathLike[str] | None = None) -> str:
    """The asset's sha256 after checking that it exists and matches checksums.json; raises AssetError if not."""
    _, data = _read_verified(name, assets_dir)
    return hashlib.sha256(data).hexdigest()


def load_asset(
    name: str, assets_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a verified asset. The checksum is checked before safetensors parses the bytes."""
    from safetensors.torch import load

    path, data = _read_verified(name, assets_dir)
    try:
        # safetensors layout: 8-byte little-endian header length, then a JSON header holding "__metadata__".
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
        state_dict = load(data)
    except Exception as exc:  # a checksum-valid file that does not parse was written by something else
        raise AssetError(f"asset {name!r} at {path} matches its checksum but is not a varq safetensors file "
                         f"({exc}). {_FIX_HINT}") from exc
    return state_dict, meta
