"""Provenance of a result row: which code, library, device and dtype produced it, and when (the row itself:
``varq.rows``; writes: ``varq.atomic``)."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["git_sha", "provenance"]


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device, dtype: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "git_sha": git_sha(),
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass W&B refuses
        "device": f"{device.type}:{name}",
        "dtype": dtype,
        # CPU GEMMs split their sums by thread, so the thread count changes the last bits of every FP pass and,
        # through AdaRound, the fitted rounding: the digits demo's ours W4A4 gives FID2FP16 15.108 with 2 threads
        # and 14.561 with 1 under the same run id. The row says which it was.
        "torch_threads": int(torch.get_num_threads()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
