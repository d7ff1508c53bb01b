"""One teacher-forced attention pass that computes, for every query scale, what the KV-cached step computes.

In a KV-cached pass the queries of scale k attend to the keys of scales 0..k, and the dynamic K/V quantizers see
only those keys: a range over the key axis (K per (b, h, channel), V per (b, h)) is a *prefix* range that grows with
k. Reconstruction repeats the attention stage thousands of times, and a Python loop over the scales launches ten
times the kernels each iteration needs. This module computes all scales at once in a **concatenated-key layout**:
with S_k the end of scale k, block k holds keys 0..S_k-1 quantized with the ranges of that prefix, and the blocks
are concatenated along the key axis (T = Σ_k S_k entries):

    K̂_cat (B, H, T, c),  logits = Q̂ K̂_catᵀ (B, H, L, T),  bias: a row of scale k sees block k only (−inf elsewhere)
    Â = q(softmax(logits)) (exact zeros outside the block),   out = Â V̂_cat (B, H, L, c)

Prefix ranges need no loop: a per-scale segment min/max over the key axis, a cumulative min/max over the scales, then
a gather to the layout; the quantizer's own qparams and fake-quant arithmetic run on the gathered ranges (so the
step floor, zero-point rule and STE are its own). A quantizer whose range never spans two key tokens (per token or
group, or a frozen static one) is applied once and its rows gathered.

What this pass cannot reproduce it refuses (`check_vectorisable`, before any fit): a range over the key axis from
another estimator than min/max, a softmax quantizer other than log2 per query row (a uniform per-row range would
see the masked zeros and move its minimum to 0), `PerScale`, an unknown ``av_matmul`` and LiteVAR's
``skip_single_key``. fp32 sums run in another order than in the cached steps, so results agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from varq.quant.attention import AttentionOperandQuant, _softmax
from varq.quant.granularity import PerAxes, PerChannel, PerGroup, PerScale, PerToken, layout_for
from varq.quant.quantizer import FakeQuantizer

__all__ = ["PrefixLayout", "prefix_layout", "prefix_ranges", "quantize_keys", "check_vectorisable", "prefix_attention"]

_FIX = "set attention_pass=cached"
_KEY_AXIS = 2  # of a (B, H, S, c) key / value tensor
# What the log2 softmax quantizer sees at a masked entry instead of 0: a normal float, whose log2 is computed at full
# speed (log2(0) takes a slow path, 27x slower on this CPU, and 3/4 of the entries are masked at 256 px), far below
# the row max (≥ 1/T), so it never is the reference; its code is set back to 0 after quantizing.
MASKED_FLOOR = 2.0**-100


@dataclass(frozen=True)
class PrefixLayout:
    """Index tensors of the concatenated-key layout of one sequence of scales (built once per shape and device).

    Attributes:
        ends: S_k, the end of every scale (the keys query scale k sees are 0..S_k-1).
        key_scale_S: scale of every token (S,) (segment index of the per-scale reductions).
        key_idx_T: token index of every entry of the layout (T,): block k is ``arange(S_k)``.
        block_T: the block (query scale) of every entry (T,).
        bias_LT: additive fp32 mask (L, T): 0 where the row's scale owns the block, −inf elsewhere.
        rows_T: query rows of the entry's block (T,), fp32 (the importance of shift-and-sum is a mean over them).
        floor_LT: fp32 (L, T): 2^-100 where the mask hides an entry, 0 elsewhere (see `_quantize_softmax`).
        hidden_LT: bool (L, T): where the mask hides an entry.
    """

    ends: tuple[int, ...]
    key_scale_S: torch.Tensor
    key_idx_T: torch.Tensor
    block_T: torch.Tensor
    bias_LT: torch.Tensor
    rows_T: torch.Tensor
    floor_LT: torch.Tensor
    hidden_LT: torch.Tensor

    @property
    def num_scales(self) -> int:
        return len(self.ends)

    @property
    def num_tokens(self) -> int:
        return self.ends[-1]


def prefix_layout(ends: tuple[int, ...], device: torch.device | str = "cpu") -> PrefixLayout:
    """The `PrefixLayout` of scales ending at ``ends`` (strictly increasing, first ≥ 1)."""
    ends = tuple(int(e) for e in ends)
    if not ends or ends[0] < 1 or any(b >= e for b, e in zip(ends, ends[1:])):
        raise ValueError(f"scale ends must be strictly increasing and positive, got {ends}")
    begins = (0,) + ends[:-1]
    sizes_K = torch.tensor([e - b for b, e in zip(begins, ends)])
    ends_K = torch.tensor(ends)
    key_scale_S = torch.repeat_interleave(torch.arange(len(ends)), sizes_K)
    block_T = torch.repeat_interleave(torch.arange(len(ends)), ends_K)
    # position inside its block: a running index minus the block's start offset
    offsets_K = torch.cumsum(ends_K, 0) - ends_K
    key_idx_T = torch.arange(int(ends_K.sum())) - offsets_K[block_T]
    visible_LT = key_scale_S[:, None] == block_T[None, :]
    bias_LT = torch.zeros(visible_LT.shape).masked_fill_(~visible_LT, float("-inf"))
    rows_T = sizes_K[block_T].float()
    floor_LT = torch.zeros(visible_LT.shape).masked_fill_(~visible_LT, MASKED_FLOOR)
    tensors = (key_scale_S, key_idx_T, block_T, bias_LT, rows_T, floor_LT, ~visible_LT)
    return PrefixLayout(ends, *(t.to(device) for t in tensors))


# ------------------------------------------------------------------------------------------------ operand modes
def _key_local(granularity) -> bool:
    # no range spans two key tokens (dim 2 of (B, H, S, c)): per token or group along channels, or dim 2 kept
    if isinstance(granularity, (PerToken, PerGroup)):
        return True
    if isinstance(granularity, (PerAxes, PerChannel)):
        return _KEY_AXIS not in layout_for(granularity, (1, 1, 1, 1)).reduce_dims
    return False


def _active(q: nn.Module | None) -> bool:
    return q is not None and getattr(q, "enabled", True)


def _refuse(op: AttentionOperandQuant, operand: str, what: str) -> ValueError:
    return ValueError(f"block {op.block_idx}: attention_pass=vectorised cannot reproduce {operand} ({what}); {_FIX}")


def _active_fake_quantizer(op: AttentionOperandQuant, operand: str) -> FakeQuantizer | None:
    """The operand's quantizer when it is on (None when off); only a FakeQuantizer's ranges can be reproduced."""
    q = getattr(op, operand)
    if not _active(q):
        return None
    if not isinstance(q, FakeQuantizer):
        raise _refuse(op, operand, f"a {type(q).__name__}, not a FakeQuantizer")
    return q


def _key_mode(op: AttentionOperandQuant, operand: str) -> str:
    """"off", "rows" (quantize every token once, gather) or "prefix" (ranges over the visible keys) for K or V."""
    q = _active_fake_quantizer(op, operand)
    if q is None:
        return "off"
    spec = q.spec
    if q.observing:
        raise _refuse(op, operand, "it is calibrating (observing)")
    if isinstance(spec.granularity, PerScale):
        raise _refuse(op, operand, "PerScale granularity")
    if not spec.dynamic or _key_local(spec.granularity):
        return "rows"
    if spec.estimator != "minmax":
        raise _refuse(op, operand, f"a dynamic {spec.estimator} range over the key axis; only min/max has prefix ranges")
    if q.pre_transform is not None:
        raise _refuse(op, operand, "a pre_transform before a range over the key axis")
    return "prefix"


def _check_query(op: AttentionOperandQuant) -> None:
    q = _active_fake_quantizer(op, "q_quantizer")
    if q is None:
        return
    if q.observing or isinstance(q.spec.granularity, PerScale):
        raise _refuse(op, "q_quantizer", "it is calibrating or PerScale")
    if q.spec.dynamic and not _key_local(q.spec.granularity):  # the token axis of Q is the query axis
        raise _refuse(op, "q_quantizer", f"a dynamic {q.spec.granularity} range spans the queries of a scale")


def _check_softmax(op: AttentionOperandQuant) -> None:
    q = _active_fake_quantizer(op, "attn_quantizer")
    if q is None:
        return
    spec = q.spec
    # log2 maps the masked zeros to 0 and, with the row max as reference (|min| = 0 never exceeds it), sees the
    # block's own range; a uniform range per row would take 0 as its minimum, and other granularities span rows
    per_row = isinstance(spec.granularity, PerToken) or (
        isinstance(spec.granularity, PerAxes) and {d % 4 for d in spec.granularity.keep} >= {0, 1, 2}
    )
    if q.observing or spec.kind != "log2" or q.pre_transform is not None:
        raise _refuse(op, "attn_quantizer", f"a {spec.kind} softmax quantizer; only log2 keeps the masked zeros out")
    if spec.dynamic and not (per_row and spec.estimator == "minmax"):
        raise _refuse(op, "attn_quantizer", f"dynamic {spec.granularity} / {spec.estimator} ranges, not per row")
    if not spec.dynamic and isinstance(spec.granularity, PerScale):
        raise _refuse(op, "attn_quantizer", "PerScale granularity")


def check_vectorisable(op: AttentionOperandQuant, ends: tuple[int, ...]) -> None:
    """Raise a ValueError naming the block, the operand and the fix when the vectorised pass would differ."""
    if op.skip_single_key and ends and ends[0] == 1:
        raise _refuse(op, "skip_single_key", "A and V stay FP at the single-key first scale")
    _check_query(op)
    _check_softmax(op)
    _key_mode(op, "k_quantizer")
    v_mode = _key_mode(op, "v_quantizer")
    if op.av_matmul is not None and v_mode != "off":
        prefix_av = getattr(op.av_matmul, "forward_prefix", None)
        if prefix_av is None:
            raise _refuse(op, "av_matmul", f"{type(op.av_matmul).__name__} has no forward_prefix")
        check = getattr(op.av_matmul, "check_prefix", None)
        if check is not None:
            check(op)


# ------------------------------------------------------------------------------------------------ numerics
@torch.no_grad()
def prefix_ranges(
    x_BHSc: torch.Tensor, granularity, layout: PrefixLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max ranges of every block of the layout, broadcastable to (B, H, T, c).

    Block k gets the range of ``granularity`` over keys 0..S_k-1: a key-local granularity's rows are gathered, one
    that reduces the key axis takes a per-scale segment min/max followed by a cumulative min/max over the scales
    (min and max are exact, so this equals reducing each prefix directly).
    """
    if isinstance(granularity, (PerGroup, PerScale)):
        raise ValueError(f"prefix ranges support ungrouped granularities, got {granularity}")
    x32 = x_BHSc.float()
    dims = layout_for(granularity, x32.shape).reduce_dims
    others = tuple(d for d in dims if d != _KEY_AXIS)
    lo = x32.amin(dim=others, keepdim=True) if others else x32
    hi = x32.amax(dim=others, keepdim=True) if others else x32
    if _KEY_AXIS in dims:
        shape = list(lo.shape)
        shape[_KEY_AXIS] = layout.num_scales
        idx = layout.key_scale_S.view(1, 1, -1, 1).expand(*lo.shape)
        lo = lo.new_full(shape, float("inf")).scatter_reduce_(_KEY_AXIS, idx, lo, "amin")
        hi = hi.new_full(shape, float("-inf")).scatter_reduce_(_KEY_AXIS, idx, hi, "amax")
        lo, hi = torch.cummin(lo, dim=_KEY_AXIS).values, torch.cummax(hi, dim=_KEY_AXIS).values
        index_T = layout.block_T
    else:
        index_T = layout.key_idx_T
    return lo.index_select(_KEY_AXIS, index_T), hi.index_select(_KEY_AXIS, index_T)


def quantize_keys(q: nn.Module | None, mode: str, x_BHSc: torch.Tensor, layout: PrefixLayout) -> torch.Tensor:
    """K̂_cat / V̂_cat (B, H, T, c): every block quantized as the cached step of its scale quantizes its keys."""
    if mode == "off":
        return x_BHSc.index_select(_KEY_AXIS, layout.key_idx_T)
    if mode == "rows":
        return q(x_BHSc).index_select(_KEY_AXIS, layout.key_idx_T)
    lo, hi = prefix_ranges(x_BHSc, q.spec.granularity, layout)
    x_cat = x_BHSc.index_select(_KEY_AXIS, layout.key_idx_T)
    return q._fake_quant(x_cat, lo, hi, q.rounding).to(x_BHSc.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the given quantized values; backward: the gradient unchanged to the unquantized input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x_hat

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _quantize_softmax(q: nn.Module | None, attn_BHLT: torch.Tensor, layout: PrefixLayout) -> torch.Tensor:
    # The (B, H, L, T) softmax is the largest tensor of the pass, about 4x the cached steps' entries at 256 px. The
    # log2 quantizer (the only one `check_vectorisable` admits) has an identity straight-through gradient, so its
    # values come from the in-place inference kernels (bit for bit the autograd formulas, tests/quant/
    # test_fast_primitives.py) and autograd keeps one node instead of a dozen full-size temporaries. The masked
    # zeros are lifted to MASKED_FLOOR for the quantizer (fast log2) and set back to exactly 0 after it.
    if not _active(q):
        return attn_BHLT
    with torch.no_grad():
        attn_hat = q(attn_BHLT.detach() + layout.floor_LT.to(attn_BHLT.dtype)).masked_fill_(layout.hidden_LT, 0.0)
    if not (torch.is_grad_enabled() and attn_BHLT.requires_grad):
        return attn_hat
    return _StraightThrough.apply(attn_BHLT, attn_hat)


def prefix_attention(
    op: AttentionOperandQuant, q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
    scale: float, layout: PrefixLayout,
) -> torch.Tensor:
    """The attention output (B, H, L, c) of a full teacher-forced pass, scale k seeing keys 0..S_k-1 quantized as
    in the KV-cached step of scale k. ``op``'s token context must hold the scales of all L tokens."""
    L = q_BHLc.shape[2]
    if L != layout.num_tokens or k_BHLc.shape[2] != L:
        raise ValueError(f"block {op.block_idx}: the vectorised pass needs all {layout.num_tokens} tokens, got {L}")
    check_vectorisable(op, layout.ends)  # a handful of attribute checks: a quantizer swapped later is still caught
    op.calls += 1
    q_hat = op._quantize(op.q_quantizer, q_BHLc, None)
    k_cat = quantize_keys(op.k_quantizer, _key_mode(op, "k_quantizer"), k_BHLc, layout)
    attn_BHLT = _softmax(q_hat, k_cat, layout.bias_LT, scale, q_BHLc.dtype)
    attn_hat = _quantize_softmax(op.attn_quantizer, attn_BHLT, layout)
    v_mode = _key_mode(op, "v_quantizer")
    if op.av_matmul is not None and v_mode != "off":
        return op.av_matmul.forward_prefix(op, attn_hat, attn_BHLT, v_BHLc, layout)
    return torch.matmul(attn_hat, quantize_keys(op.v_quantizer, v_mode, v_BHLc, layout))
