"""The digits split and the uint8 conversions, checked against independent numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from varq.data import digits_split_indices, load_digits_split, to_model_range, to_uint8


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """n_out×n_in interpolation weights with PyTorch's align_corners=False convention (half-pixel centres)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w = src - i0
        m[i, i0] += 1 - w
        m[i, i1] += w
    return m


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    test_idx, train_idx = digits_split_indices("test"), digits_split_indices("train")
    assert np.array_equal(test_idx, digits_split_indices("test"))
    assert len(np.intersect1d(test_idx, train_idx)) == 0
    assert np.array_equal(np.union1d(test_idx, train_idx), np.arange(1797))
    assert len(test_idx) == 360
    labels = load_digits().target
    per_class_total = np.bincount(labels, minlength=10)
    per_class_test = np.bincount(labels[test_idx], minlength=10)
    assert np.all(np.abs(per_class_test - 0.2 * per_class_total) <= 1.0)


def test_images_are_bilinear_upsampled_grey_rgb() -> None:
    images_N3HW, labels_N = load_digits_split("test")
    assert images_N3HW.shape == (360, 3, 32, 32) and images_N3HW.dtype == torch.uint8
    assert labels_N.dtype == torch.int64
    bunch = load_digits()
    idx = digits_split_indices("test")
    assert np.array_equal(labels_N.numpy(), bunch.target[idx])
    m = _bilinear_matrix(8, 32)
    expected_N32x32 = np.einsum("ij,njk,lk->nil", m, bunch.images[idx] / 16.0, m)
    expected_u8 = np.clip(np.round(expected_N32x32 * 255.0), 0, 255)
    for c in range(3):
        # float32 (torch) vs float64 (here) may differ by one level exactly at .5 boundaries
        assert np.abs(images_N3HW[:, c].numpy().astype(int) - expected_u8).max() <= 1


def test_uint8_round_trip_and_rounding() -> None:
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(u8)), u8)
    assert to_model_range(u8).min() == -1.0 and to_model_range(u8).max() == 1.0
    # rounding, not truncation: a value 0.6 levels above 10 becomes 11; out-of-range values clamp
    x = torch.tensor([(10.6 / 255) * 2 - 1, (10.4 / 255) * 2 - 1, -3.0, 3.0])
    assert to_uint8(x).tolist() == [11, 10, 0, 255]
    with pytest.raises(TypeError):
        to_model_range(u8.float())
