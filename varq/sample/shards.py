"""Sample shards on disk: one .npz per batch (uint8 images, labels, seed, checksum), written atomically.

A shard counts as done only if it loads and its checksum matches, so a truncated or corrupted file from a killed
job is regenerated instead of silently entering the metrics.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np


class ShardError(RuntimeError):
    pass


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a unique temporary name in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_path(folder: Path, batch_index: int) -> Path:
    return folder / f"batch_{batch_index:06d}.npz"


def write_shard(path: Path, images_N3HW: np.ndarray, labels_N: np.ndarray, seed: int) -> None:
    if images_N3HW.dtype != np.uint8:
        raise ShardError(f"shard images must be uint8, got {images_N3HW.dtype}")
    buf = io.BytesIO()
    np.savez(buf, images=images_N3HW, labels=labels_N.astype(np.int64), seed=np.int64(seed),
             sha256=np.array(_digest(images_N3HW, labels_N.astype(np.int64))))
    atomic_write_bytes(path, buf.getvalue())


def read_shard(path: Path, expected_labels: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels, digest = data["images"], data["labels"], str(data["sha256"])
    except Exception as err:
        raise ShardError(f"unreadable shard {path}: {type(err).__name__}: {err}") from None
    if _digest(images, labels) != digest:
        raise ShardError(f"checksum mismatch in shard {path}")
    if expected_labels is not None and tuple(labels.tolist()) != tuple(expected_labels):
        raise ShardError(f"shard {path} holds other labels than its batch plan (config changed?)")
    return images, labels


def shard_is_complete(path: Path, expected_labels: tuple[int, ...]) -> bool:
    if not path.is_file():
        return False
    try:
        read_shard(path, expected_labels)
        return True
    except ShardError:
        return False
