"""File locks that say who they are waiting for.

A sweep's jobs share the FP16 reference, the calibration cache and (with shards) a run's quantizer; each of those
is guarded by a lock file. A job that has to wait logs which run it waits for and the host/pid holding it, so a
stuck lock in a SLURM log is one grep away instead of a silent hang.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def _owner_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def lock_holder(lock_path: Path) -> str:
    try:
        return _owner_file(Path(lock_path)).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def held(lock_path: Path, what: str) -> Iterator[None]:
    """Hold the lock at ``lock_path`` (guarding ``what``), logging once if another process holds it first."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for %s held by %s (lock %s)", what, lock_holder(lock_path), lock_path)
        lock.acquire()
    try:
        try:
            _owner_file(lock_path).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        except OSError:
            pass  # the note is for people reading logs; the lock itself is what matters
        yield
    finally:
        lock.release()
