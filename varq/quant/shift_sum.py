"""Shift-and-sum value quantization for the A·V matmul (methods.md §3.3), as an ``AttentionOperandQuant.av_matmul``.

Per (batch row, head, key token j) the mean FP attention a_j of the current scale's queries picks an order

    m_j = clamp(ceil(log2(a_j / θ)), 0, max_order)        (computed as Σ_i [a_j > 2^i θ], exact in floats)

with one global threshold θ (chosen under a BitOPs budget, `varq.quant.bitops`). Value rows with m_j = 0 are
quantized by V's own quantizer as usual. A row with m_j ≥ 1 is quantized as the average of n = 2^m_j copies shifted
by (2i+1)/(2n) of a step before rounding; that average is exactly round(n·u)/n (Hermite's identity, round half up),
so we compute the closed form: the row lands on a grid 2^m times finer over V's own range, with b-bit operands only.

No quantizer class of its own: Δ_V and z_V come from ``owner.v_quantizer`` (THE `FakeQuantizer`, uniform kind).

Two passes are supported with the same numerics:

* KV-cached (sampling, `varq.quant.replay`): the queries are one scale, the keys are every cached scale.
* Teacher-forced (``var(label, x)``, L = S = all tokens): query rows are split by scale and scale k sees only the
  keys of scales ≤ k — V's range, the importance and the matmul all use that prefix, so each scale gets exactly
  what the cached pass computes for it (the block-causal mask already zeroes the later keys).

Reconstruction's vectorised attention pass (`varq.quant.prefix_attention`) calls `ShiftSumAV.forward_prefix`
instead: every query scale at once in the concatenated-key layout, with the same importance, orders and V ranges.

With the owner's ``query_chunk`` set, `ShiftSumAV.forward_chunked` never holds more than one chunk of query rows of
the softmax: a first sweep sums the FP attention of every chunk (the importance is that sum over the scale's rows
divided by their count), a second recomputes each chunk's softmax and multiplies it with the finished V̂. Summing
per chunk can change the last bit of a_j against the one-pass mean, so an order can differ only for a key whose
a_j sits within an ulp of a threshold 2^i·θ.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from varq.models.lookup import adapter_for
from varq.quant.attention import AttentionOperandQuant, AttentionRows, query_chunks, write_rows
from varq.quant.granularity import PerGroup, PerScale
from varq.quant.prefix_attention import PrefixLayout, prefix_ranges
from varq.quant.quantizer import FakeQuantizer

__all__ = [
    "ImportanceRecord",
    "ShiftSumAV",
    "key_orders",
    "round_half_up",
    "shifted_average",
    "shift_sum_codes",
    "install_shift_sum",
    "shift_sum_modules",
    "set_theta",
    "record_importance",
]

MAX_ORDER = 3  # up to 2^3 = 8 copies, as in the released code


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 1/2): the rounding convention under which the shifted average has its closed form."""
    return torch.floor(x + 0.5)


def shifted_average(u: torch.Tensor, n: int) -> torch.Tensor:
    """Reference form: (1/n) Σ_{i=-n/2}^{n/2-1} round(u + (2i+1)/(2n)) for n = 2^m ≥ 2 (tests use it)."""
    if n < 2 or n & (n - 1):
        raise ValueError(f"n must be a power of two >= 2, got {n}")
    offsets = [(2 * i + 1) / (2 * n) for i in range(-n // 2, n // 2)]
    return sum(round_half_up(u + o) for o in offsets) / n


def shift_sum_codes(u: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """round(n·u)/n with n = 2^order (broadcast), straight-through gradient; order 0 is plain round half up."""
    n = torch.exp2(order.to(u.dtype))
    if not torch.is_grad_enabled():  # u + (codes - u) == codes exactly; skip the two extra full-size passes
        return (u * n).add_(0.5).floor_().div_(n)
    codes = round_half_up(u * n) / n
    return u + (codes - u).detach()


def key_orders(importance: torch.Tensor, theta: float | torch.Tensor, max_order: int = MAX_ORDER) -> torch.Tensor:
    """m = clamp(ceil(log2(a/θ)), 0, max_order) as a count of thresholds passed (ceil(log2 r) ≥ i+1 ⟺ r > 2^i)."""
    # float64 like the θ search (`bitops.extra_cost`), so the orders counted there are the ones used here
    a = importance.double()
    theta = float(theta)
    order = torch.zeros_like(a, dtype=torch.long)
    for i in range(max_order):
        order += (a > theta * 2**i).long()
    return order


@dataclass
class ImportanceRecord:
    """Mean FP attention per key of one (block, query scale) call, for the θ search (`varq.quant.bitops`)."""

    block_idx: int
    scale_idx: int  # -1 when the scales are unknown (a bare attention call)
    num_queries: int  # s1: query tokens of that scale per sequence
    importance_BHS: torch.Tensor  # a_j, float32 on the CPU
    v_bits: int


class ShiftSumAV(nn.Module):
    """The ``av_matmul`` plug-in: quantizes V (with shift-and-sum rows) and computes Â·V̂.

    θ lives in a buffer, so it is part of the quantizer state (`quantizer_state_dict`); ``theta = inf`` turns the
    shift-and-sum rows off (plain V quantization). ``extra_bitops_frac`` records the budget the θ search spent.
    Set ``recorder`` to a list to collect `ImportanceRecord`s (see `record_importance`).
    """

    def __init__(self, theta: float = math.inf, max_order: int = MAX_ORDER):
        super().__init__()
        if not 1 <= max_order <= 8:
            raise ValueError(f"max_order must be in [1, 8], got {max_order}")
        self.max_order = max_order
        # float64: θ is a grid value k/10000 and must round-trip exactly through the saved state
        self.register_buffer("theta", torch.tensor(float(theta), dtype=torch.float64))
        self.register_buffer("extra_bitops_frac", torch.tensor(float("nan"), dtype=torch.float64))
        self.recorder: list[ImportanceRecord] | None = None

    @property
    def active(self) -> bool:
        return math.isfinite(float(self.theta))

    def _groups(self, owner: AttentionOperandQuant, L: int, S: int) -> list[tuple[slice, int, int]]:
        # (query rows, scale index, visible keys) from the shapes alone (no device sync in the sampling loop):
        # a cached step has L = pn_k² queries and S = end of scale k; a teacher-forced pass has L = S = all tokens.
        ends = [end for _, end in owner.scale_bounds]
        if L == S and L > 1 and ends:
            if L != ends[-1]:
                raise ValueError(f"block {owner.block_idx}: a full pass needs {ends[-1]} tokens, got {L}")
            begins = [0] + ends[:-1]
            return [(slice(b, e), k, e) for k, (b, e) in enumerate(zip(begins, ends))]
        scale = ends.index(S) if S in ends else -1
        return [(slice(0, L), scale, S)]

    def forward(
        self, owner: AttentionOperandQuant, attn_hat_BHLS: torch.Tensor, attn_BHLS: torch.Tensor, v_BHSc: torch.Tensor
    ) -> torch.Tensor:
        vq = self._v_quantizer(owner)
        L, S = attn_BHLS.shape[-2], attn_BHLS.shape[-1]
        outs = []
        for rows, scale_idx, S_k in self._groups(owner, L, S):
            attn_BHlS = attn_BHLS[:, :, rows, :S_k]
            importance_BHS = None
            if self.active or self.recorder is not None:
                importance_BHS = attn_BHlS.float().mean(dim=2)
            v_hat = self._v_hat(owner, vq, v_BHSc[:, :, :S_k], importance_BHS, scale_idx, attn_BHlS.shape[2])
            outs.append(torch.matmul(attn_hat_BHLS[:, :, rows, :S_k], v_hat))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def forward_chunked(
        self, owner: AttentionOperandQuant, attn_rows: AttentionRows, v_BHSc: torch.Tensor, L: int, chunk: int
    ) -> torch.Tensor:
        """The same output as `forward` from at most ``chunk`` query rows of the softmax at a time."""
        vq = self._v_quantizer(owner)
        S = v_BHSc.shape[2]
        outs = []
        for rows, scale_idx, S_k in self._groups(owner, L, S):
            chunks = query_chunks(rows.stop - rows.start, chunk)
            chunks = [slice(rows.start + c.start, rows.start + c.stop) for c in chunks]
            importance_BHS = None
            if self.active or self.recorder is not None:  # first sweep: Σ over the rows, then one division
                total_BHS = sum(attn_rows(c, False)[0][..., :S_k].float().sum(dim=2) for c in chunks)
                importance_BHS = total_BHS / (rows.stop - rows.start)
            v_hat = self._v_hat(owner, vq, v_BHSc[:, :, :S_k], importance_BHS, scale_idx, rows.stop - rows.start)
            outs.extend(torch.matmul(attn_rows(c, True)[1][..., :S_k], v_hat) for c in chunks)  # type: ignore[index]
        return write_rows(outs)

    # ---------------------------------------------------------------- vectorised teacher-forced pass
    def check_prefix(self, owner: AttentionOperandQuant) -> None:
        """Refuse (ValueError naming the block and the fix) a V quantizer `forward_prefix` cannot reproduce."""
        vq = owner.v_quantizer
        ok = (
            isinstance(vq, FakeQuantizer) and vq.spec.kind == "uniform" and vq.spec.dynamic
            and vq.spec.estimator == "minmax" and vq.pre_transform is None and not vq.observing
            and not isinstance(vq.spec.granularity, (PerGroup, PerScale))
        )
        if not ok:
            raise ValueError(
                f"block {owner.block_idx}: attention_pass=vectorised cannot reproduce shift-and-sum with the "
                f"v_quantizer {_describe(vq)} (it needs a dynamic min/max uniform quantizer without groups); set "
                f"attention_pass=cached"
            )

    def forward_prefix(
        self, owner: AttentionOperandQuant, attn_hat_BHLT: torch.Tensor, attn_BHLT: torch.Tensor,
        v_BHSc: torch.Tensor, layout: PrefixLayout,
    ) -> torch.Tensor:
        """`forward` of every query scale at once in the concatenated-key layout (`varq.quant.prefix_attention`).

        Block k holds V's rows 0..S_k-1 with the range of that prefix; the importance of an entry is the mean FP
        attention over the rows of its block's scale. Every other row is exactly 0 in that column (the mask), so
        the column sum over all L rows divided by the block's row count is that mean, without a loop over scales.
        """
        vq = self._v_quantizer(owner)
        lo_BHTc, hi_BHTc = prefix_ranges(v_BHSc, vq.spec.granularity, layout)
        v_BHTc = v_BHSc.index_select(2, layout.key_idx_T)
        v_hat = vq._fake_quant(v_BHTc, lo_BHTc, hi_BHTc, vq.rounding).to(v_BHSc.dtype)
        if self.active or self.recorder is not None:
            importance_BHT = attn_BHLT.float().sum(dim=2) / layout.rows_T
            if self.recorder is not None:
                self._record_blocks(owner, importance_BHT, layout, vq.spec.bits)
            if self.active:
                order_BHT = key_orders(importance_BHT, self.theta, self.max_order)
                v_hat = self._finer_rows(vq, v_BHTc, v_hat, order_BHT, *vq._qparams(lo_BHTc, hi_BHTc))
        return torch.matmul(attn_hat_BHLT, v_hat)

    def _record_blocks(
        self, owner: AttentionOperandQuant, importance_BHT: torch.Tensor, layout: PrefixLayout, v_bits: int,
    ) -> None:
        # recording feeds the θ search, not a reconstruction iteration: one record per scale, as the cached pass
        rows = layout.rows_T.tolist()
        for k, block in enumerate(importance_BHT.detach().cpu().split(list(layout.ends), dim=-1)):
            begin = sum(layout.ends[:k])
            self.recorder.append(ImportanceRecord(owner.block_idx, k, int(rows[begin]), block, v_bits))  # type: ignore[union-attr]

    @staticmethod
    def _v_quantizer(owner: AttentionOperandQuant) -> FakeQuantizer:
        vq = owner.v_quantizer
        if not isinstance(vq, FakeQuantizer) or vq.spec.kind != "uniform":
            raise TypeError(f"block {owner.block_idx}: shift-and-sum needs a uniform FakeQuantizer on V, got {vq!r}")
        return vq

    def _v_hat(
        self, owner: AttentionOperandQuant, vq: FakeQuantizer, v_BHSc: torch.Tensor,
        importance_BHS: torch.Tensor | None, scale_idx: int, num_queries: int,
    ) -> torch.Tensor:
        # the usual quantization of every visible row (ranges over the visible keys), then the finer rows
        if importance_BHS is None or not self.active:
            v_hat, qparams = vq(v_BHSc), None
        elif vq.spec.dynamic and vq.pre_transform is None and not vq.observing:
            v_hat, *qparams = vq.forward_with_qparams(v_BHSc)  # one range estimate for both
        else:
            v_hat, qparams = vq(v_BHSc), (vq.qparams(v_BHSc) if vq.spec.dynamic else vq.qparams())
        if importance_BHS is None:
            return v_hat
        if self.recorder is not None:
            self.recorder.append(ImportanceRecord(
                owner.block_idx, scale_idx, num_queries, importance_BHS.detach().cpu(), vq.spec.bits,
            ))
        if not self.active:
            return v_hat
        order_BHS = key_orders(importance_BHS, self.theta, self.max_order)
        return self._finer_rows(vq, v_BHSc, v_hat, order_BHS, *qparams)  # type: ignore[misc]

    @staticmethod
    def _finer_rows(
        vq: FakeQuantizer, v_BHSc: torch.Tensor, v_hat_BHSc: torch.Tensor, order_BHS: torch.Tensor,
        scale: torch.Tensor, zero_point: torch.Tensor,
    ) -> torch.Tensor:
        # Same Δ_V and z_V as the plain rows (one range per (b, h)); only the rounding of the chosen rows changes.
        order_BHS1 = order_BHS.unsqueeze(-1)
        codes = shift_sum_codes(v_BHSc.float() / scale, order_BHS1)
        if torch.is_grad_enabled():
            codes = codes + zero_point
            fine = ((torch.clamp(codes, 0, 2**vq.spec.bits - 1) - zero_point) * scale).to(v_BHSc.dtype)
        else:  # the same arithmetic in place on the one temporary
            fine = codes.add_(zero_point).clamp_(0, 2**vq.spec.bits - 1).sub_(zero_point).mul_(scale).to(v_BHSc.dtype)
        return torch.where(order_BHS1 >= 1, fine, v_hat_BHSc)

    def extra_repr(self) -> str:
        return f"theta={float(self.theta):.4g}, max_order={self.max_order}"


def _describe(q: nn.Module | None) -> str:
    if not isinstance(q, FakeQuantizer):
        return type(q).__name__
    s = q.spec
    state = "dynamic" if s.dynamic else "static"
    return f"({s.kind} {s.granularity} {state} {s.estimator}{' observing' if q.observing else ''})"


# ------------------------------------------------------------------------------------------------ model-level helpers
def install_shift_sum(var: nn.Module, theta: float = math.inf, max_order: int = MAX_ORDER) -> list[ShiftSumAV]:
    """Plug a `ShiftSumAV` into every block's `AttentionOperandQuant` (its θ then saves with the quantizer state)."""
    modules = []
    for attn in adapter_for(var).attention_modules().values():
        op = attn.operand_quant
        if not isinstance(op, AttentionOperandQuant) or op.v_quantizer is None:
            raise ValueError("shift-and-sum needs quantized attention with a V quantizer in every block")
        op.av_matmul = ShiftSumAV(theta, max_order).to(op.v_quantizer.frozen.device)
        modules.append(op.av_matmul)
    return modules


def shift_sum_modules(var: nn.Module) -> list[ShiftSumAV]:
    return [m for m in var.modules() if isinstance(m, ShiftSumAV)]


@torch.no_grad()
def set_theta(var: nn.Module, theta: float, extra_bitops_frac: float | None = None) -> None:
    """Set the global θ (and optionally the budget fraction it spends) in every block."""
    for m in shift_sum_modules(var):
        m.theta.fill_(float(theta))
        if extra_bitops_frac is not None:
            m.extra_bitops_frac.fill_(float(extra_bitops_frac))


@contextlib.contextmanager
def record_importance(var: nn.Module):
    """Collect the `ImportanceRecord` of every shift-and-sum call while the block runs (one list for all blocks)."""
    records: list[ImportanceRecord] = []
    modules = shift_sum_modules(var)
    try:
        for m in modules:
            m.recorder = records
        yield records
    finally:
        for m in modules:
            m.recorder = None
