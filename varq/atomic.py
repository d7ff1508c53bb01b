"""Atomic writes and self-healing reads: the one place varq puts bytes on disk and takes them back.

Every artifact is written to a unique temporary name in its own folder, fsynced, then renamed, so a reader never
sees half a file and two writers never share a partial one. A write that fails (disk full, quota, permissions)
removes its temporary and raises ``ArtifactWriteError`` naming the path. A read of an artifact that turns out to
be unreadable moves the file aside (``NAME.corrupt``) with a warning, so the stage that makes it simply runs again:
nothing crashes forever on a truncated file left by a killed job.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
CORRUPT_SUFFIX = ".corrupt"


class ArtifactWriteError(OSError):
    """Writing an artifact failed; the message names the file and the cause (e.g. the disk is full)."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a shared cache must be readable by other users' jobs
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise ArtifactWriteError(
                err.errno, f"cannot write {path}: {os.strerror(err.errno) if err.errno else err}; free space or "
                "point paths.root / paths.cache at a writable folder with room") from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def save_npz_atomic(path: Path, arrays: dict) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_torch_atomic(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def quarantine(path: Path, reason: str) -> Path:
    """Move an unreadable artifact aside (keeping earlier ones) so the stage that makes it runs again."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{n}")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another job healed it first
        return target
    log.warning("unreadable artifact %s (%s): moved to %s, rebuilding it", path, reason, target.name)
    return target


def read_or_heal(path: Path, load: Callable[[Path], T], validate: Callable[[T], None] | None = None) -> T | None:
    """``load(path)`` (then ``validate``, which raises on bad content), or None when the file is absent or was
    unreadable — in which case it has been moved aside and the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = load(path)
        if validate is not None:
            validate(value)
        return value
    except Exception as err:  # truncated, binary, foreign or wrong-shaped: all mean "make it again"
        quarantine(path, f"{type(err).__name__}: {str(err)[:200]}")
        return None


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_dict(path: Path) -> dict | None:
    """A JSON object artifact (row, metrics, timings), healed when unreadable or not an object."""

    def is_dict(value: Any) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")

    return read_or_heal(path, read_json, is_dict)
