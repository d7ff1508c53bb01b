"""Which labels and seeds each batch gets: a pure function of the eval config, so every run sees identical
conditions (FP16 vs quantized, first try vs resumed, one GPU vs many shards)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from varq.config import EvalConfig


@dataclass(frozen=True)
class BatchPlan:
    index: int
    labels: tuple[int, ...]
    seed: int  # the torch.Generator seed of this batch

    def label_tensor(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)


def eval_labels(cfg: EvalConfig, num_classes: int) -> list[int]:
    """Class-major order: samples_per_class copies of each class (all classes unless cfg.classes is set)."""
    classes = list(range(num_classes)) if cfg.classes is None else list(cfg.classes)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"eval.classes has ids outside [0, {num_classes}): {bad}")
    return [c for c in classes for _ in range(cfg.samples_per_class)]


def plan_batches(cfg: EvalConfig, num_classes: int) -> list[BatchPlan]:
    labels = eval_labels(cfg, num_classes)
    if cfg.batch_size < 1:
        raise ValueError("eval.batch_size must be ≥ 1")
    return [
        BatchPlan(index=b, labels=tuple(labels[start : start + cfg.batch_size]), seed=cfg.seed + b)
        for b, start in enumerate(range(0, len(labels), cfg.batch_size))
    ]


def shard_of(plans: list[BatchPlan], num_shards: int, shard: int) -> list[BatchPlan]:
    """Shard k owns batches b ≡ k (mod num_shards): disjoint, and together they cover every batch."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside [0, {num_shards})")
    return [p for p in plans if p.index % num_shards == shard]
