"""Range estimators: pure functions from data to a clipping range (x_min, x_max) per group.

Each takes the grouped view of a tensor and its `Layout` and returns ranges in the layout's
parameter shape (keepdim, or (num_scales,) for `PerScale`). Ranges are statistics, so these run
without autograd. The searching estimators take `fake_quant(x_view, x_min, x_max)` (ranges already
broadcast to the view) so that they score the quantizer kind that will actually be used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .granularity import Layout, expand_to_view, reduce_groups

__all__ = ["FakeQuantFn", "range_minmax", "range_percentile", "range_mse", "group_quantiles"]

FakeQuantFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# PTQ4ARVG's percentile candidates (methods.md §4.2).
DEFAULT_QUANTILES = (0.999, 0.9999, 0.99999)


@torch.no_grad()
def range_minmax(
    x_view: torch.Tensor, layout: Layout, scale_idx_L: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain min/max per group."""
    x32 = x_view.float()
    return reduce_groups(x32, layout, "amin", scale_idx_L), reduce_groups(x32, layout, "amax", scale_idx_L)


def _quantile_sorted(s: torch.Tensor, q: float) -> torch.Tensor:
    # Linear interpolation between order statistics, as torch.quantile's default; torch.quantile
    # itself refuses inputs above 2^24 elements, which calibration tensors exceed.
    n = s.shape[-1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    w = pos - lo
    return s[..., lo] * (1 - w) + s[..., hi] * w


def group_quantiles(
    x_view: torch.Tensor, layout: Layout, qs: tuple[float, ...], scale_idx_L: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The quantiles `qs` of every group, each in the layout's parameter shape (absent scales: 0)."""
    x32 = x_view.float()
    if layout.segment_dim is not None:
        if scale_idx_L is None:
            raise ValueError("PerScale granularity needs scale_idx_L (the VAR scale of each token)")
        idx_L = scale_idx_L.to(device=x32.device, dtype=torch.long).flatten()
        outs = [torch.zeros(layout.num_segments, device=x32.device) for _ in qs]
        for k in torch.unique(idx_L).tolist():
            sel = x32.index_select(layout.segment_dim, torch.nonzero(idx_L == k).flatten())
            s = sel.flatten().sort().values
            for out, q in zip(outs, qs):
                out[k] = _quantile_sorted(s, q)
        return outs
    keep = [d for d in range(x32.ndim) if d not in layout.reduce_dims]
    flat = x32.permute(*keep, *layout.reduce_dims).flatten(start_dim=len(keep))
    s = flat.sort(dim=-1).values
    keepdim_shape = [1 if d in layout.reduce_dims else x32.shape[d] for d in range(x32.ndim)]
    return [_quantile_sorted(s, q).reshape(keepdim_shape) for q in qs]


def _search(
    x_view: torch.Tensor,
    layout: Layout,
    fake_quant: FakeQuantFn,
    candidates: list[tuple[torch.Tensor, torch.Tensor]],
    p: float,
    scale_idx_L: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per group, the candidate range with the smallest Σ|x - Q(x)|^p (first wins ties)."""
    x32 = x_view.float()
    best = None
    for lo, hi in candidates:
        xq = fake_quant(x32, expand_to_view(lo, layout, scale_idx_L), expand_to_view(hi, layout, scale_idx_L))
        err = reduce_groups((x32 - xq.float()).abs().pow(p), layout, "sum", scale_idx_L)
        if best is None:
            best = (err, lo.clone(), hi.clone())
            continue
        better = err < best[0]
        best = (torch.where(better, err, best[0]), torch.where(better, lo, best[1]), torch.where(better, hi, best[2]))
    assert best is not None
    return best[1], best[2]


@torch.no_grad()
def range_percentile(
    x_view: torch.Tensor,
    layout: Layout,
    fake_quant: FakeQuantFn,
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
    scale_idx_L: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PTQ4ARVG's percentile search (methods.md §4.2): for each q try [quantile(1-q), quantile(q)]
    and keep, per group, the pair with the smallest squared error ‖x - Q(x)‖²."""
    qs = tuple(quantiles) + tuple(1.0 - q for q in quantiles)
    values = group_quantiles(x_view, layout, qs, scale_idx_L)
    n = len(quantiles)
    candidates = [(values[n + i], values[i]) for i in range(n)]
    return _search(x_view, layout, fake_quant, candidates, 2.0, scale_idx_L)


@torch.no_grad()
def range_mse(
    x_view: torch.Tensor,
    layout: Layout,
    fake_quant: FakeQuantFn,
    p: float = 2.4,
    num_candidates: int = 80,
    shrink_step: float = 0.01,
    scale_idx_L: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BRECQ-style search: shrink the min/max range by c ∈ {1, 1-step, …} and keep, per group, the
    c with the smallest Σ|x - Q(x)|^p. c = 1 (plain min/max) is tried first, so the result is
    never worse than min/max under the same norm."""
    x_min, x_max = range_minmax(x_view, layout, scale_idx_L)
    # Absent PerScale entries are ±inf; zero them so the arithmetic stays finite.
    x_min = torch.where(torch.isfinite(x_min), x_min, torch.zeros_like(x_min))
    x_max = torch.where(torch.isfinite(x_max), x_max, torch.zeros_like(x_max))
    candidates = []
    for i in range(num_candidates):
        c = 1.0 - i * shrink_step
        if c <= 0:
            break
        candidates.append((x_min * c, x_max * c))
    return _search(x_view, layout, fake_quant, candidates, p, scale_idx_L)
