"""Precision/recall on point clouds whose answer is known by hand, and against a brute-force implementation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import torch

from varq.metrics.manifold import manifold_radii, precision_recall


def _line(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32).unsqueeze(1)


def test_identical_sets_give_full_precision_and_recall() -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_far_apart_sets_give_zero_precision_and_recall() -> None:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_radii_are_squared_kth_neighbour_distances_with_self_as_neighbour_zero() -> None:
    # points 0, 1, 2, 3: sorted squared distances per point, index 3 → [9, 4, 4, 9]
    assert manifold_radii(_line(0, 1, 2, 3), k=3).tolist() == [9.0, 4.0, 4.0, 9.0]
    assert manifold_radii(_line(0, 1, 2, 3), k=1).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_one_dimensional_case_by_hand() -> None:
    # real 0..3 → balls [-3,3], [-1,3], [0,4], [0,6]: manifold [-3, 6] (6.0 lies exactly on the boundary: inside)
    # fake 5.5, 6, 10, 10.5, 11 → radii² 25, 20.25, 16, 20.25, 25 → balls from 0.5 on: real 0 is outside
    real, fake = _line(0, 1, 2, 3), _line(5.5, 6.0, 10.0, 10.5, 11.0)
    assert manifold_radii(fake, k=3).tolist() == [25.0, 20.25, 16.0, 20.25, 25.0]
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(2 / 5) and recall == pytest.approx(3 / 4)


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    d_rr = scipy.spatial.distance.cdist(real, real, "sqeuclidean")
    d_ff = scipy.spatial.distance.cdist(fake, fake, "sqeuclidean")
    d_rf = scipy.spatial.distance.cdist(real, fake, "sqeuclidean")
    r_real, r_fake = np.sort(d_rr, axis=1)[:, k], np.sort(d_ff, axis=1)[:, k]
    precision = (d_rf <= r_real[:, None]).any(axis=0).mean()
    recall = (d_rf <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("batch_size", [7, 10_000])
def test_matches_brute_force_in_any_batching(batch_size: int) -> None:
    rng = np.random.default_rng(3)
    real = rng.normal(size=(120, 5))
    fake = rng.normal(size=(90, 5)) * 1.3 + 0.4  # overlapping, so both numbers are strictly between 0 and 1
    expected = _brute_force(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=3, batch_size=batch_size)
    assert got == pytest.approx(expected, abs=1e-12)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="different spaces"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))
