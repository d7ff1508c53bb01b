"""Fixtures shared by the method tests: one tiny FP model pair and one calibration set per module."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
from varq.calib import CalibSet


@pytest.fixture(scope="module")
def models():
    return tiny_var(), tiny_vqvae()


@pytest.fixture(scope="module")
def calib_set(models):
    var, vqvae = models
    label_N, x_NLC, idx = random_teacher_batch(vqvae, B=8, seed=5)
    return CalibSet(labels_N=label_N, seeds_N=torch.zeros(8, dtype=torch.long), idx_per_scale=idx,
                    teacher_input_NLC=x_NLC, num_classes=var.num_classes, cfg=1.5)
