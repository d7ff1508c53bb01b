"""BitOPs of a (fake-)quantized model and the shift-and-sum threshold θ under a BitOPs budget (methods.md §3.4).

Counting convention: one **CFG pair** (a cond and an uncond sequence) sampled scale by scale with the KV cache.
A matmul of an (r × k) by (k × n) operand pair costs r·k·n·b_x·b_w bit operations; a layer or operand left FP
counts 16 bits. The model adapter gives the rows of every Linear and the attention MACs per pair; for VAR, with
l_k = pn_k² tokens at scale k and S_k = l_0 + … + l_k cached keys:

* the projections of a block (kinds qkv, attn_out, ffn_up, ffn_down) and the head: 2·l_k rows at every scale;
* the input embedding: l_k rows for k ≥ 1 — the sampler embeds the next input once and repeats it for both halves;
* every AdaLN Linear (kinds adaln, head_adaln): 2 rows at every scale (the condition is re-modulated per scale);
* attention, per block and scale: QKᵀ and Â·V, each 2·H·l_k·S_k·head_dim MACs at their operands' bits.

The extra cost of shift-and-sum (the released `compute_bitop.py`, restated in §3.4) at one (block, scale), per
sequence: H·s1·s2·16 (means) + H·s2·16 + H·s2·4 (compare/count), plus per duplicated value row d·16 + s1 (adds) +
s1·d·b² (the extra MACs), with s1 = l_k, s2 = S_k. We sum it over both sequences of a pair, so total and extra use the
same unit (the released code divides the extra by its batch B, which may count both halves: then its budget is
effectively twice ours). θ is the smallest grid value whose extra cost stays within α·total. Because
m_j = Σ_i [a_j > 2^i θ], the duplicated rows are 2^m − 1 = Σ_i 2^i·[a_j > 2^i θ], so extra(θ) over the whole grid
follows from one sort of the a_j and a searchsorted — no loop over grid points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from varq.models.lookup import adapter_for
from varq.quant.attention import AttentionOperandQuant
from varq.quant.qmodules import QuantLinear
from varq.quant.shift_sum import MAX_ORDER, ImportanceRecord

__all__ = ["BitOps", "ThetaChoice", "ExtraCost", "model_bitops", "extra_cost", "choose_theta", "theta_grid"]

FP_BITS = 16


@dataclass(frozen=True)
class BitOps:
    """BitOPs of one CFG pair, split by kind (floats: d16 totals exceed int32 and are only compared)."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def _bits(quantizer: nn.Module | None) -> int:
    if quantizer is None or not getattr(quantizer, "enabled", True):
        return FP_BITS
    return int(quantizer.spec.bits)


def model_bitops(var: nn.Module, fp_linear_bits: tuple[int, int] | None = None) -> BitOps:
    """BitOPs of one CFG pair of ``var`` as it is quantized now (FP layers and operands at 16 bits).

    Rows per Linear and attention MACs come from the model adapter. ``fp_linear_bits = (w_bits, a_bits)`` counts a
    Linear left FP (not swapped for a QuantLinear, e.g. ours_litevar's fc2) at those bits instead of 16 × 16: the
    released ``compute_total_bitop`` multiplies every quantizable Linear by the run's global w_bit·a_bit, whether
    or not its quantizers are switched on.
    """
    adapter = adapter_for(var)
    linear = 0.0
    for site in adapter.linears():
        m = var.get_submodule(site.fqn)
        if isinstance(m, QuantLinear):
            w_bits, a_bits = _bits(m.weight_quantizer), _bits(m.input_quantizer)
        else:
            w_bits, a_bits = fp_linear_bits if fp_linear_bits is not None else (FP_BITS, FP_BITS)
        linear += adapter.linear_rows_per_pair(site) * m.in_features * m.out_features * w_bits * a_bits
    attention = 0.0
    for i, attn in adapter.attention_modules().items():
        op = attn.operand_quant
        if isinstance(op, AttentionOperandQuant):
            qk_bits = _bits(op.q_quantizer) * _bits(op.k_quantizer)
            av_bits = _bits(op.attn_quantizer) * _bits(op.v_quantizer)
        else:
            qk_bits = av_bits = FP_BITS * FP_BITS
        attention += adapter.attention_macs_per_pair(i) * (qk_bits + av_bits)
    return BitOps(linear=linear, attention=attention)


@dataclass
class ExtraCost:
    """extra(θ) = const + Σ_i 2^i · W(2^i θ), with W(t) = Σ_j w_j [a_j > t] over every recorded key (per pair)."""

    const: float
    a_sorted: torch.Tensor  # (n,) float64 ascending
    w_suffix: torch.Tensor  # (n + 1,) float64: w_suffix[i] = Σ_{j ≥ i} w_sorted[j]
    max_order: int = MAX_ORDER

    def __call__(self, theta_G: torch.Tensor) -> torch.Tensor:
        theta_G = torch.as_tensor(theta_G, dtype=torch.float64)
        extra_G = torch.full_like(theta_G, self.const)
        for i in range(self.max_order):
            t_G = theta_G * 2**i
            # a_j > t ⟺ j ≥ (number of a ≤ t) in the ascending order
            first_above_G = torch.searchsorted(self.a_sorted, t_G, right=True)
            extra_G += 2**i * self.w_suffix[first_above_G]
        return extra_G


def extra_cost(
    records: Sequence[ImportanceRecord], head_dim: int, num_pairs: int, max_order: int = MAX_ORDER,
) -> ExtraCost:
    """The extra BitOPs of shift-and-sum per CFG pair as a function of θ, from recorded importances.

    ``records`` come from replaying ``num_pairs`` CFG pairs (`varq.quant.shift_sum.record_importance`).
    """
    if not records:
        raise ValueError("no importance records: run the quantized model under record_importance() first")
    d = head_dim
    const = 0.0
    a_parts, w_parts = [], []
    for r in records:
        rows, H, s2 = r.importance_BHS.shape
        s1 = r.num_queries
        const += rows * (H * s1 * s2 * 16 + H * s2 * 16 + H * s2 * 4)
        a_parts.append(r.importance_BHS.flatten().double())
        per_row = float(d * 16 + s1 + s1 * d * r.v_bits**2)  # cost of one duplicated value row
        w_parts.append(torch.full((r.importance_BHS.numel(),), per_row, dtype=torch.float64))
    a_n, w_n = torch.cat(a_parts), torch.cat(w_parts)
    a_sorted, order = torch.sort(a_n, stable=True)
    w_suffix = torch.cat((w_n[order].flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)))
    return ExtraCost(const / num_pairs, a_sorted, w_suffix / num_pairs, max_order)


def theta_grid(size: int = 10_000) -> torch.Tensor:
    """{k/size : k = 1..size} (the released grid has size 10,000)."""
    if size < 1:
        raise ValueError(f"theta grid size must be >= 1, got {size}")
    return torch.arange(1, size + 1, dtype=torch.float64) / size


@dataclass(frozen=True)
class ThetaChoice:
    theta: float
    extra_bitops: float
    total_bitops: float
    alpha: float
    budget_binding: bool  # False: even the smallest grid θ fits (the released code asserts this never happens)

    @property
    def extra_frac(self) -> float:
        return self.extra_bitops / self.total_bitops


def choose_theta(cost: ExtraCost, total_bitops: float, alpha: float = 0.01, grid_size: int = 10_000) -> ThetaChoice:
    """The smallest θ on the grid with extra(θ) ≤ α·total (extra is non-increasing in θ, so the rest fit too)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    grid_G = theta_grid(grid_size)
    extra_G = cost(grid_G)
    fits_G = extra_G <= alpha * total_bitops
    if not bool(fits_G.any()):
        raise ValueError(
            f"no θ on the grid fits a {alpha:.2%} BitOPs budget: the fixed shift-and-sum overhead alone is "
            f"{cost.const / total_bitops:.2%} of the model; raise quant.alpha"
        )
    k = int(fits_G.long().argmax())  # first True
    return ThetaChoice(float(grid_G[k]), float(extra_G[k]), float(total_bitops), float(alpha), budget_binding=k > 0)
