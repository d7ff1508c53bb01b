"""``calib=distinct``: Shift-and-Sum's calibration generations *without* the resampling (methods.md §3.5 steps 1–2).

The classes are drawn as ``calib=resample`` draws them and sampled by the FP model with the same batches and seeds,
so with equal ``calib`` settings the sequences are exactly the ones ``resample`` starts from, before its per-scale
histogram correction. This is the calibration of the BRECQ baseline in Shift-and-Sum's framework (§5.1): the
released code has one calibration path, and its BRECQ rows differ from "ours" by shift-and-sum and resampling only.
"""

from __future__ import annotations

import torch

from varq.calib.calib_set import CalibSet
from varq.calib.random import fp_generations
from varq.calib.resample import draw_distinct_labels
from varq.config import RunConfig

__all__ = ["build"]


def build(cfg: RunConfig, var, vqvae, device: torch.device) -> CalibSet:
    labels_N = draw_distinct_labels(cfg.calib.n_images, var.num_classes, cfg.calib.seed, cfg.calib.class_draw)
    calib_set = fp_generations(cfg, var, vqvae, device, labels_N)
    calib_set.meta = {"distinct_classes": len(labels_N)}
    return calib_set
