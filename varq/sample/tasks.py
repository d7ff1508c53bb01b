"""The generation tasks: class-conditional sampling, and zero-shot inpainting, outpainting and class-conditional
editing (research/var.md §4). Every task offers the same interface (``varq.sample.batches.GenerationTask``):
``plan``, ``generate_batch`` and ``reference_stats``; ``build_task`` returns the one a run configures.

Class-conditional (``class_cond``): the labels of ``eval`` (``varq.sample.layout.plan_batches``), FID against the
model's reference statistics (``model.reference``).

The ordinary KV-cached sampler with one intervention: after each scale is sampled, the tokens the mask keeps are
replaced by the input image's own tokens (``override_idx``), before f_hat accumulates and the next scale's input is
built, so the generated region is conditioned on the kept one through both f_hat and the KV cache. Attention is
not masked; the logits of kept positions are computed and ignored.

- mask: a box [y0, x0, y1, x1] in [0, 1] marks a P×P map at the finest token scale (P = patch_nums[-1]);
  inpaint and edit regenerate the box (keep = outside), outpaint keeps the box and regenerates the rest;
- per scale: keep = bilinear(map, pn×pn, align_corners=False) > 0.5, and the 1×1 scale is always kept;
- label: the null class for in/outpainting (both CFG halves unconditional, so cfg has no effect), the target
  class (true + edit_shift) mod num_classes for editing.

The inputs (``varq.data.task_inputs``) and the batch plan are a pure function of the config and the input files:
the first ``task.per_class`` images of each class in a fixed order, ``eval.batch_size`` per batch, batch b seeded
with ``eval.seed + b``; the plan's labels are the true classes (in/outpaint) or the target classes (edit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from varq.config import EvalConfig, ModelConfig, RunConfig, TaskConfig, stable_hash
from varq.sample.batches import batch_generator, images_u8, sampling_dtype
from varq.sample.layout import BatchPlan, eval_labels, plan_batches

EDIT_TASKS = ("inpaint", "outpaint", "edit")
TokenHook = Callable[[int, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------------- class_cond
@dataclass(frozen=True)
class ClassCondTask:
    """Plain class-conditional sampling: the eval's labels, FID against the model's reference statistics."""

    num_classes: int
    reference: str = "imagenet256"  # model.reference
    image_size: int = 256  # model.image_size

    name = "class_cond"

    @classmethod
    def of(cls, model: ModelConfig) -> ClassCondTask:
        return cls(model.num_classes, model.reference, model.image_size)

    def plan(self, ev: EvalConfig) -> list[BatchPlan]:
        return plan_batches(ev, self.num_classes)

    def generate_batch(self, var, vqvae, plan: BatchPlan, ev: EvalConfig, device: torch.device) -> np.ndarray:
        from varq.sample.sampler import generate

        img_B3HW = generate(
            var, vqvae, plan.label_tensor().to(device), cfg=ev.cfg, top_k=ev.top_k, top_p=ev.top_p,
            rng=batch_generator(plan, device), more_smooth=ev.more_smooth, autocast_dtype=sampling_dtype(ev.dtype),
        )
        return images_u8(img_B3HW)

    def reference_stats(self, ev: EvalConfig, cache_dir: Path, device) -> dict[str, np.ndarray]:
        from varq.metrics.fidelity import reference_stats

        return reference_stats(self.reference, cache_dir=cache_dir, npz_path=ev.reference_npz, device=device,
                               image_size=self.image_size)


# ---------------------------------------------------------------------------------------------------- masks
def box_map(box: Sequence[float], side: int) -> torch.Tensor:
    """(side, side) float map, 1 on rows round(y0·side):round(y1·side) × cols round(x0·side):round(x1·side)."""
    y0, x0, y1, x1 = box
    map_PP = torch.zeros(side, side)
    # Python's round (half to even) on purpose: the official demo indexes with it
    map_PP[round(y0 * side) : round(y1 * side), round(x0 * side) : round(x1 * side)] = 1.0
    return map_PP


def keep_map(task: str, box: Sequence[float], side: int) -> torch.Tensor:
    """1 where the input's tokens are kept: outside the box for inpaint/edit, inside it for outpaint."""
    if task not in EDIT_TASKS:
        raise ValueError(f"keep_map: task {task!r} is not one of {', '.join(EDIT_TASKS)}")
    inside_PP = box_map(box, side)
    return inside_PP if task == "outpaint" else 1.0 - inside_PP


def scale_keep_masks(keep_PP: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """Per scale, a bool (pn·pn,) row-major keep mask: bilinear resize (align_corners=False) of the map, > 0.5.

    Scales with at most 3 tokens (only 1×1 in practice) are kept whole, as in the official demo: the first
    token carries the global layout, and regenerating it would ignore the kept region altogether.
    """
    masks = []
    for pn in patch_nums:
        if pn * pn <= 3:
            masks.append(torch.ones(pn * pn, dtype=torch.bool))
            continue
        small_11hw = F.interpolate(keep_PP[None, None].float(), size=(pn, pn), mode="bilinear", align_corners=False)
        masks.append(small_11hw.gt(0.5).flatten())
    return masks


def override_with_ground_truth(gt_idx_Bl: Sequence[torch.Tensor], keep_l: Sequence[torch.Tensor],
                               on_tokens: TokenHook | None = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The sampler's ``override_idx``: kept positions take the input's token, the others keep the sampled one."""

    def override(si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        keep = keep_l[si].to(idx_Bl.device)
        out_Bl = torch.where(keep, gt_idx_Bl[si].to(idx_Bl.device), idx_Bl)
        if on_tokens is not None:
            on_tokens(si, out_Bl)
        return out_Bl

    return override


@torch.no_grad()
def generate_masked(var, vqvae, images_u8: torch.Tensor, cond_label_B: torch.Tensor, keep_l: Sequence[torch.Tensor],
                    *, on_tokens: TokenHook | None = None, **sample_kw: Any) -> torch.Tensor:
    """Edit uint8 images (B,3,H,W) at the model's size → (B,3,H,W) in [0, 1]; ``sample_kw`` go to ``generate``."""
    from varq.data.images import to_model_range
    from varq.sample.sampler import generate

    if sample_kw.get("more_smooth"):
        # the Gumbel path embeds soft tokens and never reads override_idx: the kept region would be lost
        raise ValueError("editing tasks need more_smooth=False (the Gumbel path ignores the token replacement)")
    device = var.lvl_1L.device
    # fp32 encoding outside any autocast: the ground-truth tokens must not depend on the sampling dtype
    gt_idx_Bl = vqvae.img_to_idxBl(to_model_range(images_u8).to(device))
    override = override_with_ground_truth(gt_idx_Bl, keep_l, on_tokens)
    return generate(var, vqvae, cond_label_B.to(device), override_idx=override, **sample_kw)


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TaskBatchPlan(BatchPlan):
    image_ids: tuple[int, ...] = ()  # rows of the input catalogue
    cond_labels: tuple[int, ...] = ()  # what VAR is conditioned on: the null class, or the edit's target class


def select_inputs(labels: Sequence[int], classes: Sequence[int], per_class: int) -> list[int]:
    """The first ``per_class`` catalogue rows of each class, class-major in the order of ``classes``."""
    rows = []
    for c in classes:
        ids = [i for i, label in enumerate(labels) if label == c][:per_class]
        if len(ids) < per_class:
            raise ValueError(f"task.per_class={per_class} but class {c} has only {len(ids)} input images")
        rows.extend(ids)
    return rows


class EditTask:
    """inpaint / outpaint / edit bound to its inputs; the generation stage calls ``plan`` and ``generate_batch``."""

    def __init__(self, task: TaskConfig, model: ModelConfig):
        from varq.data.task_inputs import DigitsInputs, FolderInputs

        self.cfg, self.model = task, model
        self.null_label = model.num_classes
        if task.images_dir is not None:
            self.inputs = FolderInputs(task.images_dir, model.image_size, model.num_classes)
        elif model.reference == "var_digits":
            self.inputs = DigitsInputs(model.image_size)
        else:
            raise ValueError(f"task={task.name} on model={model.name} needs input images: set "
                             "task.images_dir=/path/to/imagenet/val (one sub-folder per class)")
        if task.name == "edit" and task.edit_shift % model.num_classes == 0:
            raise ValueError(f"task.edit_shift={task.edit_shift} maps every class onto itself; use 1…"
                             f"{model.num_classes - 1}")

    @property
    def name(self) -> str:
        return self.cfg.name

    def keep_map(self) -> torch.Tensor:
        return keep_map(self.name, self.cfg.box, self.model.patch_nums[-1])

    def keep_masks(self) -> list[torch.Tensor]:
        return scale_keep_masks(self.keep_map(), self.model.patch_nums)

    def image_ids(self, ev: EvalConfig) -> list[int]:
        # eval.classes (validated, in its order) or every class; eval.samples_per_class does not apply to tasks
        classes = eval_labels(dataclasses.replace(ev, samples_per_class=1), self.model.num_classes)
        return select_inputs(self.inputs.labels, classes, self.cfg.per_class)

    def plan(self, ev: EvalConfig) -> list[TaskBatchPlan]:
        """Batches of the fixed input subset; labels: the true class (in/outpaint) or the target class (edit)."""
        if ev.batch_size < 1:
            raise ValueError("eval.batch_size must be ≥ 1")
        ids = self.image_ids(ev)
        true = [self.inputs.labels[i] for i in ids]
        if self.name == "edit":
            labels = [(c + self.cfg.edit_shift) % self.model.num_classes for c in true]
            cond = labels
        else:
            labels, cond = true, [self.null_label] * len(ids)
        return [
            TaskBatchPlan(index=b, labels=tuple(labels[s : s + ev.batch_size]), seed=ev.seed + b,
                          image_ids=tuple(ids[s : s + ev.batch_size]), cond_labels=tuple(cond[s : s + ev.batch_size]))
            for b, s in enumerate(range(0, len(ids), ev.batch_size))
        ]

    def generate_batch(self, var, vqvae, plan: TaskBatchPlan, ev: EvalConfig, device: torch.device,
                       on_tokens: TokenHook | None = None) -> np.ndarray:
        if ev.more_smooth:
            raise ValueError(f"task={self.name} needs eval.more_smooth=false (the Gumbel path ignores the mask)")
        img_B3HW = generate_masked(
            var, vqvae, self.inputs.load(plan.image_ids), torch.tensor(plan.cond_labels), self.keep_masks(),
            on_tokens=on_tokens, cfg=ev.cfg, top_k=ev.top_k, top_p=ev.top_p, rng=batch_generator(plan, device),
            autocast_dtype=sampling_dtype(ev.dtype),
        )
        return images_u8(img_B3HW)

    def input_images(self, ev: EvalConfig) -> torch.Tensor:
        """The whole input subset (uint8, plan order): the real images FID is measured against."""
        return self.inputs.load(self.image_ids(ev))

    def reference_stats(self, ev: EvalConfig, cache_dir: Path, device) -> dict[str, np.ndarray]:
        """FID statistics of the input subset under the model's feature extractor, cached by what the images and
        the extractor are."""
        from varq.atomic import save_npz_atomic
        from varq.metrics.fidelity import cached_stats, compute_features, feature_stats

        extractor, inception_weights = self.model.feature_extractor, ev.inception_weights
        ids = self.image_ids(ev)
        key = {"inputs": self.inputs.identity(ids), "extractor": extractor,
               "weights": _extractor_digest(extractor, inception_weights)}
        path = Path(cache_dir) / f"ref-task-{stable_hash(key, 16)}.npz"
        stats = cached_stats(path)
        if stats is not None:
            return stats
        feats = compute_features(self.inputs.load(ids), extractor, device=device, inception_weights=inception_weights)
        stats = feature_stats(feats["features"])
        save_npz_atomic(path, stats)
        return stats


def _extractor_digest(extractor: str, inception_weights: str | None) -> str:
    from varq.metrics.extractors import DIGITS_EXTRACTOR

    if extractor == DIGITS_EXTRACTOR:  # retrained classifier weights must never meet statistics of the old ones
        from varq.models.assets import verify_asset
        from varq.models.classifier import DIGITS_CLASSIFIER_ASSET

        return verify_asset(DIGITS_CLASSIFIER_ASSET)[:16]
    return Path(inception_weights).name if inception_weights else "default"


def build_task(cfg: RunConfig):
    """The run's task: ``ClassCondTask`` for class_cond, ``T2ITask`` for a text-to-image model (whose protocol names
    a prompt file), an ``EditTask`` for inpaint / outpaint / edit."""
    if cfg.model.family == "infinity":
        if cfg.task.name != "class_cond":
            raise ValueError(f"task={cfg.task.name} is class-conditional VAR only; a text-to-image model generates "
                             "from eval.prompts (task=class_cond, the default)")
        from varq.sample.t2i import T2ITask

        return T2ITask.of(cfg)
    if cfg.task.name == "class_cond":
        return ClassCondTask.of(cfg.model)
    if cfg.eval.more_smooth:
        raise ValueError(f"task={cfg.task.name} needs eval.more_smooth=false (the Gumbel path ignores the mask)")
    return EditTask(cfg.task, cfg.model)
