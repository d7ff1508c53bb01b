"""Sample shards on disk: one .npz per batch (uint8 images, labels, seed, checksum), written atomically.

A shard counts as done only if it loads and its checksum matches, so a truncated or corrupted file from a killed
job is regenerated instead of silently entering the metrics.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from varq.atomic import atomic_write_bytes


class ShardError(RuntimeError):
    pass


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def shard_path(folder: Path, batch_index: int) -> Path:
    return folder / f"batch_{batch_index:06d}.npz"


def shard_owner(path: Path) -> str:
    """The run a shard belongs to: its run directory's name, which ends in the run id (``<run>/samples/batch_*``).
    Recorded in the shard, so a shard copied in from another run is recognised as foreign and regenerated."""
    return Path(path).parent.parent.name


def _batch_index(path: Path) -> int:
    return int(Path(path).stem.rsplit("_", 1)[-1])


def write_shard(path: Path, images_N3HW: np.ndarray, labels_N: np.ndarray, seed: int) -> None:
    if images_N3HW.dtype != np.uint8:
        raise ShardError(f"shard images must be uint8, got {images_N3HW.dtype}")
    buf = io.BytesIO()
    np.savez(buf, images=images_N3HW, labels=labels_N.astype(np.int64), seed=np.int64(seed),
             owner=np.array(shard_owner(path)), batch_index=np.int64(_batch_index(path)),
             sha256=np.array(_digest(images_N3HW, labels_N.astype(np.int64))))
    atomic_write_bytes(path, buf.getvalue())


def read_shard(path: Path, expected_labels: tuple[int, ...] | None = None,
               expected_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels, digest = data["images"], data["labels"], str(data["sha256"])
            owner, index, seed = str(data["owner"]), int(data["batch_index"]), int(data["seed"])
    except Exception as err:
        raise ShardError(f"unreadable shard {path}: {type(err).__name__}: {err}") from None
    if _digest(images, labels) != digest:
        raise ShardError(f"checksum mismatch in shard {path}")
    if owner != shard_owner(path) or index != _batch_index(path):
        raise ShardError(f"shard {path} was written by run {owner} as batch {index}, not by this run (copied in?)")
    if expected_seed is not None and seed != expected_seed:
        raise ShardError(f"shard {path} was sampled with seed {seed}, its batch plan says {expected_seed}")
    if expected_labels is not None and tuple(labels.tolist()) != tuple(expected_labels):
        raise ShardError(f"shard {path} holds other labels than its batch plan (config changed?)")
    return images, labels


def shard_is_complete(path: Path, expected_labels: tuple[int, ...], expected_seed: int | None = None) -> bool:
    if not path.is_file():
        return False
    try:
        read_shard(path, expected_labels, expected_seed)
        return True
    except ShardError:
        return False
