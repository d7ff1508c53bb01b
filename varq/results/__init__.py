"""Result rows: one JSON file per run, written atomically, with provenance."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from varq.atomic import write_json_atomic

__all__ = ["git_sha", "provenance", "write_json_atomic"]


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
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
