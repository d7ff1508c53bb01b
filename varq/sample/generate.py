"""The generation stage: a task's plan → shards on disk (resumable, checksummed) → uint8 sample set.

The task (``varq.sample.tasks``) says which batches exist and how one is made; this module only schedules them,
skips what is on disk and reads the set back. ``task=None`` means plain class-conditional sampling over
``num_classes`` classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from varq.atomic import quarantine
from varq.config import EvalConfig
from varq.models.fast_decoder import decoder_mode
from varq.progress import track
from varq.sample.batches import GenerationTask
from varq.sample.layout import BatchPlan, shard_of
from varq.sample.shards import ShardError, read_shard, shard_is_complete, shard_path, write_shard
from varq.sample.tasks import ClassCondTask

log = logging.getLogger(__name__)


def _or_class_cond(task: GenerationTask | None, num_classes: int) -> GenerationTask:
    return task if task is not None else ClassCondTask(num_classes)


def task_plans(cfg: EvalConfig, num_classes: int, task: GenerationTask | None = None) -> list[BatchPlan]:
    """The batch plan of ``task`` (class-conditional over ``num_classes`` classes when None)."""
    return _or_class_cond(task, num_classes).plan(cfg)


def generate_to_dir(
    var, vqvae, cfg: EvalConfig, num_classes: int, out_dir: Path, device: torch.device,
    shard: int | None = None, task: GenerationTask | None = None,
) -> int:
    """Generate every missing or damaged batch of ``shard`` (all shards if None); returns how many were made."""
    task = _or_class_cond(task, num_classes)
    plans = task.plan(cfg)
    if shard is not None:
        plans = shard_of(plans, cfg.num_shards, shard)
    _drop_stale_temporaries(out_dir, plans)
    made = 0
    with decoder_mode(vqvae, cfg.decoder):
        for plan in track(plans, "generate", run=out_dir.parent.name, unit="batch"):
            path = shard_path(out_dir, plan.index)
            if shard_is_complete(path, plan.labels, plan.seed):
                continue
            if path.exists():  # kept aside for inspection; the batch is made again
                quarantine(path, "damaged, foreign or from another batch plan")
            images = task.generate_batch(var, vqvae, plan, cfg, device)
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


def samples_complete(cfg: EvalConfig, num_classes: int, out_dir: Path, task: GenerationTask | None = None) -> bool:
    return all(shard_is_complete(shard_path(out_dir, p.index), p.labels, p.seed) for p in task_plans(cfg, num_classes, task))


def load_samples(cfg: EvalConfig, num_classes: int, out_dir: Path,
                 task: GenerationTask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
