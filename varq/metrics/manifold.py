"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them: k-NN manifolds.

Each set's manifold is the union of balls around its points, the radius of a point being the distance to its k-th
nearest neighbour in the same set (k = 3; the point itself counts as its own 0-th neighbour, exactly as ADM takes
index k of the partially sorted distance row). Precision: the fraction of generated points inside the real manifold.
Recall: the fraction of real points inside the generated manifold. A point on the boundary is inside (``<=``).

Distances are squared Euclidean, computed block-wise (``batch_size`` rows × ``batch_size`` columns, ADM: 10,000), so
50k × 50k never sits in memory at once. The one deliberate difference: ADM computes the distance blocks in float16
whenever they are finite; here they are float32, so a point within fp16 rounding of a radius may fall on the other
side (it moves precision/recall by at most a few such points).
"""

from __future__ import annotations

import torch

PR_NEIGHBOURHOOD = 3  # ADM's nhood_sizes=[3]
PR_BATCH_SIZE = 10_000  # ADM's row_batch_size = col_batch_size


def _check(features_ND: torch.Tensor, what: str, k: int) -> torch.Tensor:
    if not torch.is_tensor(features_ND) or features_ND.dim() != 2:
        raise ValueError(f"{what} must be an N×D tensor, got {getattr(features_ND, 'shape', type(features_ND))}")
    if len(features_ND) <= k:
        raise ValueError(f"{what}: a k={k} manifold needs more than {k} points, got {len(features_ND)}")
    return features_ND.float()


def squared_distances(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """N×M squared Euclidean distances by ‖a‖² − 2ab + ‖b‖², clamped at 0 (the expansion ADM uses)."""
    sq_a_N1 = (a_ND * a_ND).sum(1, keepdim=True)
    sq_b_1M = (b_MD * b_MD).sum(1).unsqueeze(0)
    return (sq_a_N1 - 2 * a_ND @ b_MD.T + sq_b_1M).clamp_min_(0)


@torch.no_grad()
def manifold_radii(features_ND: torch.Tensor, k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour (itself being the 0-th), float32 N on CPU."""
    feats_ND = _check(features_ND, "features", k).to(device)
    radii = []
    for start in range(0, len(feats_ND), batch_size):
        rows_BD = feats_ND[start : start + batch_size]
        # keep the k+1 smallest per row while sweeping column blocks: the full row never has to exist
        best_BK = None
        for col in range(0, len(feats_ND), batch_size):
            block_BC = squared_distances(rows_BD, feats_ND[col : col + batch_size])
            if best_BK is not None:
                block_BC = torch.cat((best_BK, block_BC), dim=1)
            best_BK = block_BC.topk(min(k + 1, block_BC.shape[1]), dim=1, largest=False).values
        radii.append(best_BK.max(dim=1).values.cpu())
    return torch.cat(radii)


@torch.no_grad()
def _inside(points_ND: torch.Tensor, centres_MD: torch.Tensor, radii_M: torch.Tensor, batch_size: int,
            device: str | torch.device) -> torch.Tensor:
    """Bool N: whether each point lies in at least one ball (centre, squared radius)."""
    points_ND, centres_MD, radii_M = points_ND.to(device), centres_MD.to(device), radii_M.to(device)
    inside = torch.zeros(len(points_ND), dtype=torch.bool, device=device)
    for start in range(0, len(points_ND), batch_size):
        rows_BD = points_ND[start : start + batch_size]
        for col in range(0, len(centres_MD), batch_size):
            d_BC = squared_distances(rows_BD, centres_MD[col : col + batch_size])
            inside[start : start + batch_size] |= (d_BC <= radii_M[col : col + batch_size].unsqueeze(0)).any(1)
    return inside.cpu()


def precision_recall(real_ND: torch.Tensor, fake_MD: torch.Tensor, k: int = PR_NEIGHBOURHOOD,
                     batch_size: int = PR_BATCH_SIZE, device: str | torch.device = "cpu",
                     real_radii_N: torch.Tensor | None = None) -> tuple[float, float]:
    """(precision, recall) of generated features `fake_MD` against real features `real_ND`.

    `real_radii_N` may be passed when the same reference is scored against many sample sets (it depends on the
    reference alone).
    """
    real_ND, fake_MD = _check(real_ND, "real features", k), _check(fake_MD, "generated features", k)
    if real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f"features of different spaces: {real_ND.shape[1]}-d real vs {fake_MD.shape[1]}-d generated")
    if real_radii_N is None:
        real_radii_N = manifold_radii(real_ND, k, batch_size, device)
    fake_radii_M = manifold_radii(fake_MD, k, batch_size, device)
    precision = _inside(fake_MD, real_ND, real_radii_N, batch_size, device).double().mean()
    recall = _inside(real_ND, fake_MD, fake_radii_M, batch_size, device).double().mean()
    return float(precision), float(recall)
