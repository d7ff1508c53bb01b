"""What every generation task shares: the sampling dtypes, the per-batch generator and the task interface.

A task (``varq.sample.tasks``: class_cond, inpaint, outpaint, edit) is what the generation stage asks for its batch
plan, for one batch of images and for the real images FID is measured against; the stage itself never branches on
which task it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from varq.config import EvalConfig
from varq.data.images import to_uint8
from varq.sample.layout import BatchPlan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(name: str) -> torch.dtype | None:
    if name not in DTYPES:
        raise ValueError(f"eval.dtype={name!r}; choose one of {', '.join(DTYPES)}")
    return None if name == "fp32" else DTYPES[name]


def batch_generator(plan: BatchPlan, device: torch.device) -> torch.Generator:
    # One generator per batch on the sampling device: a batch's samples depend only on (plan, device), never on
    # which batches ran before it in this process.
    return torch.Generator(device=device).manual_seed(plan.seed)


def images_u8(img_B3HW: torch.Tensor) -> np.ndarray:
    """The sampler's [0, 1] images as the uint8 array a shard stores."""
    return to_uint8(img_B3HW * 2 - 1).cpu().numpy()


class GenerationTask(Protocol):
    """What the generation and metrics stages need from a task."""

    @property
    def name(self) -> str: ...

    def plan(self, ev: EvalConfig) -> list[BatchPlan]:
        """Every batch of the sample set: a pure function of the config (and the task's fixed inputs)."""

    def generate_batch(self, var, vqvae, plan: BatchPlan, ev: EvalConfig, device: torch.device) -> np.ndarray:
        """One batch as uint8 (B, 3, H, W)."""

    def reference_stats(self, ev: EvalConfig, cache_dir: Path, device) -> dict[str, np.ndarray]:
        """FID statistics of the real images this task's samples are compared against."""
