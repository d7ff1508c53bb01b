"""The generation stage: plan → shards on disk (resumable, checksummed) → uint8 sample set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from varq.atomic import quarantine
from varq.config import EvalConfig
from varq.data.images import to_uint8
from varq.progress import track
from varq.sample.layout import BatchPlan, plan_batches, shard_of
from varq.sample.sampler import generate
from varq.sample.shards import ShardError, read_shard, shard_is_complete, shard_path, write_shard

if TYPE_CHECKING:
    from varq.sample.tasks import EditTask

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(name: str) -> torch.dtype | None:
    if name not in DTYPES:
        raise ValueError(f"eval.dtype={name!r}; choose one of {', '.join(DTYPES)}")
    return None if name == "fp32" else DTYPES[name]


def batch_generator(plan: BatchPlan, device: torch.device) -> torch.Generator:
    # One generator per batch on the sampling device: a batch's samples depend only on (plan, device), never on
    # which batches ran before it in this process.
    return torch.Generator(device=device).manual_seed(plan.seed)


def task_plans(cfg: EvalConfig, num_classes: int, task: EditTask | None = None) -> list[BatchPlan]:
    """The batch plan: class-conditional (``task`` None) or the editing task's fixed inputs."""
    return plan_batches(cfg, num_classes) if task is None else task.plan(cfg)


def generate_batch(var, vqvae, plan: BatchPlan, cfg: EvalConfig, device: torch.device) -> np.ndarray:
    img_B3HW = generate(
        var, vqvae, plan.label_tensor().to(device), cfg=cfg.cfg, top_k=cfg.top_k, top_p=cfg.top_p,
        rng=batch_generator(plan, device), more_smooth=cfg.more_smooth, autocast_dtype=sampling_dtype(cfg.dtype),
    )
    return to_uint8(img_B3HW * 2 - 1).cpu().numpy()


def generate_to_dir(
    var, vqvae, cfg: EvalConfig, num_classes: int, out_dir: Path, device: torch.device,
    shard: int | None = None, task: EditTask | None = None,
) -> int:
    """Generate every missing or damaged batch of ``shard`` (all shards if None); returns how many were made."""
    plans = task_plans(cfg, num_classes, task)
    # class_cond goes through generate_batch exactly as before; editing tasks bring their own batch generator
    make_batch = generate_batch if task is None else task.generate_batch
    if shard is not None:
        plans = shard_of(plans, cfg.num_shards, shard)
    _drop_stale_temporaries(out_dir, plans)
    made = 0
    for plan in track(plans, "generate", run=out_dir.parent.name, unit="batch"):
        path = shard_path(out_dir, plan.index)
        if shard_is_complete(path, plan.labels, plan.seed):
            continue
        if path.exists():  # kept aside for inspection; the batch is made again
            quarantine(path, "damaged, foreign or from another batch plan")
        images = make_batch(var, vqvae, plan, cfg, device)
        write_shard(path, images, np.asarray(plan.labels), plan.seed)
        made += 1
    return made


def _drop_stale_temporaries(out_dir: Path, plans: list[BatchPlan]) -> None:
    """A writer killed between write and rename (scancel, requeue, OOM) leaves ``.batch_N.npz.<pid>.tmp`` behind; its
    batch is regenerated, so the temporary is garbage. Only this call's batches: other shards may be mid-write."""
    if not out_dir.is_dir():
        return
    mine = {shard_path(out_dir, p.index).name for p in plans}
    for tmp in out_dir.glob(".batch_*.tmp"):
        if tmp.name[1:].rsplit(".", 2)[0] in mine:
            tmp.unlink(missing_ok=True)


def samples_complete(cfg: EvalConfig, num_classes: int, out_dir: Path, task: EditTask | None = None) -> bool:
    return all(shard_is_complete(shard_path(out_dir, p.index), p.labels, p.seed) for p in task_plans(cfg, num_classes, task))


def load_samples(cfg: EvalConfig, num_classes: int, out_dir: Path,
                 task: EditTask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples in plan order as (uint8 N×3×H×W, labels N); raises if any shard is missing or damaged."""
    images, labels = [], []
    for plan in task_plans(cfg, num_classes, task):
        path = shard_path(out_dir, plan.index)
        if not path.is_file():
            raise ShardError(f"missing shard {path}")
        imgs, labs = read_shard(path, plan.labels, plan.seed)
        images.append(imgs)
        labels.append(labs)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
