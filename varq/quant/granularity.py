"""Granularities: which elements share one quantization range.

Every granularity maps to one `Layout` (torchao's block_size idea), so a single code path in
`primitives` reduces, broadcasts and quantizes for all of them:

* an optional reshape of the last dim into (n_groups, group_size) (`PerGroup`),
* the dims of that view reduced to one range (`reduce_dims`),
* optionally one dim whose entries are bucketed by an index tensor (`PerScale`: token dim → VAR scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "PerAxes",
    "PerScale",
    "Layout",
    "layout_for",
    "to_view",
    "from_view",
    "reduce_groups",
    "expand_to_view",
]


@dataclass(frozen=True)
class PerTensor:
    """One range for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One range per index of `axis` (weights: axis=0, one per output row; activations: axis=-1)."""

    axis: int = 0


@dataclass(frozen=True)
class PerToken:
    """One range per row over the last dim (Linear inputs per token; Q per (b, h, token))."""


@dataclass(frozen=True)
class PerGroup:
    """One range per row and per contiguous group of `group_size` entries along the last dim."""

    group_size: int

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


@dataclass(frozen=True)
class PerAxes:
    """One range per index of the kept dims `keep`, reducing every other dim.

    Covers attention operands: K per (b, h, channel) of a B×H×L×D tensor is `PerAxes((0, 1, 3))`,
    V per (b, h) is `PerAxes((0, 1))`.
    """

    keep: tuple[int, ...]


@dataclass(frozen=True)
class PerScale:
    """One per-tensor range per VAR scale (STWQ); the scale of each token (dim -2) comes from an index tensor.

    Ranges cover (samples × tokens of that scale × channels), so only static (calibrated) use is
    meaningful at inference, where a KV-cached step feeds the tokens of one scale.
    """

    num_scales: int

    def __post_init__(self) -> None:
        if self.num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {self.num_scales}")


Granularity = PerTensor | PerChannel | PerToken | PerGroup | PerAxes | PerScale


@dataclass(frozen=True)
class Layout:
    """How a tensor of a given shape is grouped; dims refer to the (possibly grouped) view."""

    shape: tuple[int, ...]
    group_size: int | None
    reduce_dims: tuple[int, ...]
    segment_dim: int | None = None
    num_segments: int = 0

    @property
    def view_ndim(self) -> int:
        return len(self.shape) + (1 if self.group_size is not None else 0)


def _norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} out of range for a {ndim}-D tensor")
    return dim % ndim


def layout_for(granularity: Granularity, shape: torch.Size | tuple[int, ...]) -> Layout:
    """Map a granularity and a tensor shape to its reduction layout."""
    shape = tuple(shape)
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("cannot quantize a 0-D tensor")
    all_dims = tuple(range(ndim))
    if isinstance(granularity, PerTensor):
        return Layout(shape, None, all_dims)
    if isinstance(granularity, PerChannel):
        axis = _norm_dim(granularity.axis, ndim)
        return Layout(shape, None, tuple(d for d in all_dims if d != axis))
    if isinstance(granularity, PerToken):
        return Layout(shape, None, (ndim - 1,))
    if isinstance(granularity, PerGroup):
        if shape[-1] % granularity.group_size:
            raise ValueError(f"last dim {shape[-1]} is not divisible by group_size {granularity.group_size}")
        return Layout(shape, granularity.group_size, (ndim,))
    if isinstance(granularity, PerAxes):
        keep = {_norm_dim(d, ndim) for d in granularity.keep}
        return Layout(shape, None, tuple(d for d in all_dims if d not in keep))
    if isinstance(granularity, PerScale):
        if ndim < 2:
            raise ValueError("PerScale needs a (..., L, C) tensor")
        token_dim = ndim - 2
        return Layout(shape, None, tuple(d for d in all_dims if d != token_dim), token_dim, granularity.num_scales)
    raise TypeError(f"unknown granularity {granularity!r}")


def to_view(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reshape `x` into the grouped view the layout's dims refer to."""
    if layout.group_size is None:
        return x
    return x.unflatten(-1, (-1, layout.group_size))


def from_view(x_view: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Inverse of `to_view`."""
    if layout.group_size is None:
        return x_view
    return x_view.flatten(-2)


_SEGMENT_INIT = {"amin": float("inf"), "amax": float("-inf"), "sum": 0.0}


def reduce_groups(
    x_view: torch.Tensor, layout: Layout, op: str, scale_idx_L: torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce `x_view` to one value per group with `op` in {"amin", "amax", "sum"}.

    Returns a keepdim-shaped tensor, or for `PerScale` a (num_scales,) tensor in which scales
    absent from `scale_idx_L` hold the op's identity (+inf, -inf or 0).
    """
    dims = layout.reduce_dims
    if op == "sum":
        r = x_view.sum(dim=dims, keepdim=True) if dims else x_view
    else:
        r = getattr(torch, op)(x_view, dim=dims, keepdim=True) if dims else x_view
    if layout.segment_dim is None:
        return r
    if scale_idx_L is None:
        raise ValueError("PerScale granularity needs scale_idx_L (the VAR scale of each token)")
    r_L = r.flatten()
    idx_L = scale_idx_L.to(device=r_L.device, dtype=torch.long).flatten()
    if idx_L.numel() != r_L.numel():
        raise ValueError(f"scale_idx_L has {idx_L.numel()} entries for {r_L.numel()} tokens")
    out_K = torch.full((layout.num_segments,), _SEGMENT_INIT[op], dtype=r_L.dtype, device=r_L.device)
    reduce = {"amin": "amin", "amax": "amax", "sum": "sum"}[op]
    return out_K.scatter_reduce(0, idx_L, r_L, reduce=reduce, include_self=True)


def expand_to_view(p: torch.Tensor, layout: Layout, scale_idx_L: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast a per-group parameter (keepdim or per-scale) against the grouped view."""
    if layout.segment_dim is None:
        return p
    if scale_idx_L is None:
        raise ValueError("PerScale granularity needs scale_idx_L (the VAR scale of each token)")
    idx_L = scale_idx_L.to(device=p.device, dtype=torch.long).flatten()
    trailing = layout.view_ndim - 1 - layout.segment_dim
    return p.index_select(0, idx_L).reshape(-1, *([1] * trailing))
