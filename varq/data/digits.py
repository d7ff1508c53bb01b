"""scikit-learn's digits as 32×32 RGB uint8 images with a fixed, documented train/test split.

The split: ``sklearn.model_selection.train_test_split`` over the 1797 sample indices with ``test_size=0.2``,
``random_state=0``, ``stratify=labels`` → 1437 train / 360 test, every class at its 20 % share (±1 image).
It is a pure function of the sklearn digits file, so every process (classifier, VAR training, reference
statistics) sees the same held-out images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16.0  # sklearn stores digit pixels as integers 0..16

Split = Literal["train", "test"]


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    # sklearn is imported here, not at module level: importing varq.data must stay cheap.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def digits_split_indices(split: Split) -> np.ndarray:
    """Sorted indices into ``sklearn.datasets.load_digits()`` that form `split`."""
    return _split_indices(_load_raw()[1], split)


def _split_indices(labels_N: np.ndarray, split: Split) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(labels_N)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels_N,
    )
    if split == "train":
        return np.sort(train_idx)
    if split == "test":
        return np.sort(test_idx)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def upsample_digits(raw_N88: np.ndarray, image_size: int = 32) -> torch.Tensor:
    """Raw 0..16 digit arrays (N×8×8) → uint8 N×3×S×S: bilinear (align_corners=False), rounded, grey → RGB."""
    x_N1hw = torch.from_numpy(np.ascontiguousarray(raw_N88, dtype=np.float32))[:, None] / DIGITS_MAX_VALUE
    x_N1HW = F.interpolate(x_N1hw, size=(image_size, image_size), mode="bilinear", align_corners=False)
    u8_N1HW = (x_N1HW * 255.0).round().clamp(0.0, 255.0).to(torch.uint8)
    return u8_N1HW.expand(-1, 3, -1, -1).contiguous()


def load_digits_split(split: Split, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images_N3HW uint8, labels_N int64) of one split; see the module docstring for the split's definition."""
    raw_N88, labels_all = _load_raw()
    idx = _split_indices(labels_all, split)
    images_N3HW = upsample_digits(raw_N88[idx], image_size)
    return images_N3HW, torch.from_numpy(labels_all[idx])
