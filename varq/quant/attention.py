"""Fake-quantized attention operands: the module that plugs into ``SelfAttention.operand_quant``.

With an ``operand_quant`` installed, a block's attention runs explicitly instead of through the fused SDPA kernel:

    A = softmax(Q̂ K̂ᵀ · scale + bias),   out = Â V̂

where each hat is an optional `FakeQuantizer` (methods.md §3.2: Q per (b, h, query token), K per (b, h, channel)
over every cached key, A per (b, h, query row), V per (b, h)). The KV cache stays FP in ``SelfAttention``; K and V
arrive here with the cache already concatenated, so they are quantized on the fly at every step, as in the
released Shift-and-Sum code.

Everything a later method needs to make the operands context dependent is exposed here rather than hidden in a
method-specific subclass:

* ``token_ctx`` is the model's own `TokenContext` (a reference, so it always describes the current pass): the
  scale of every query token and the cond/uncond split of a CFG batch. `query_scale_idx()` / `key_scale_idx()`
  give the scale of each query and key token; a `PerScale` quantizer receives them automatically.
* ``av_matmul`` replaces the plain ``Â @ V̂`` (and V's quantization) when V is quantized — the slot for
  shift-and-sum, which needs the FP softmax, the query scales and V's quantizer to build its finer value rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from varq.quant.granularity import PerScale
from varq.quant.quantizer import FakeQuantizer

__all__ = ["AttentionOperandQuant", "AVMatmul", "OPERANDS"]

# attribute names of the four operand quantizers, in the order they are applied
OPERANDS = ("q_quantizer", "k_quantizer", "attn_quantizer", "v_quantizer")


class AVMatmul(Protocol):
    """What ``AttentionOperandQuant.av_matmul`` must compute: the attention output (B, H, L, c).

    Receives the owner (for ``v_quantizer``, ``token_ctx``, ``query_scale_idx()``), the quantized softmax
    ``attn_hat_BHLS``, the FP softmax ``attn_BHLS`` (shift-and-sum derives each key's order from it) and the FP
    values ``v_BHSc``; it is responsible for quantizing V. In a teacher-forced pass the L query rows span every
    scale; ``owner.query_scale_idx()`` says which rows belong to which.
    """

    def __call__(
        self, owner: AttentionOperandQuant, attn_hat_BHLS: torch.Tensor, attn_BHLS: torch.Tensor, v_BHSc: torch.Tensor
    ) -> torch.Tensor: ...


class AttentionOperandQuant(nn.Module):
    """Explicit attention with optional fake quantizers on Q, K, the softmax output and V.

    Args:
        q_quantizer, k_quantizer, attn_quantizer, v_quantizer: `FakeQuantizer`s (or modules with the same
            ``(x, scale_idx_L=None) -> x̂`` call); None keeps that operand FP. A disabled quantizer
            (``enabled = False``) is the identity, so all four disabled reproduce FP attention.
        token_ctx: the model's ``token_ctx`` (pass the object itself, not a copy).
        scale_bounds: (begin, end) of every scale in the full token sequence (the model adapter's
            ``scale_bounds``); keys are always a prefix of it (the cache holds scales 0..k in order), so their
            scales follow from the key count.
        block_idx: which block this is (for error messages and per-block methods).
        skip_single_key: LiteVAR leaves A and V unquantized when only one key exists (the first scale), where
            A ≡ 1 exactly and V has a single row.
    """

    def __init__(
        self,
        q_quantizer: nn.Module | None = None,
        k_quantizer: nn.Module | None = None,
        attn_quantizer: nn.Module | None = None,
        v_quantizer: nn.Module | None = None,
        *,
        token_ctx=None,
        scale_bounds: Sequence[tuple[int, int]] = (),
        block_idx: int = -1,
        skip_single_key: bool = False,
    ):
        super().__init__()
        self.q_quantizer, self.k_quantizer = q_quantizer, k_quantizer
        self.attn_quantizer, self.v_quantizer = attn_quantizer, v_quantizer
        self.av_matmul: AVMatmul | None = None  # assign a module to have its state saved with the quantizers
        self.token_ctx = token_ctx
        self.scale_bounds = tuple((int(b), int(e)) for b, e in scale_bounds)
        self.block_idx = block_idx
        self.skip_single_key = skip_single_key
        self.calls = 0
        self._scale_of_token: torch.Tensor | None = None

    # ---------------------------------------------------------------- context
    def query_scale_idx(self) -> torch.Tensor | None:
        """Scale of every query token of the current pass (L,), or None outside a model forward."""
        return None if self.token_ctx is None else self.token_ctx.scale_idx_L

    def key_scale_idx(self, num_keys: int, device: torch.device) -> torch.Tensor | None:
        """Scale of each of the first ``num_keys`` tokens (S,); None without ``scale_bounds``."""
        if not self.scale_bounds:
            return None
        table = self._scale_of_token
        if table is None or table.device != device:
            table = torch.cat([torch.full((e - b,), i, dtype=torch.long) for i, (b, e) in enumerate(self.scale_bounds)])
            self._scale_of_token = table = table.to(device)
        if num_keys > table.numel():
            raise ValueError(f"block {self.block_idx}: {num_keys} keys but the scales hold {table.numel()} tokens")
        return table[:num_keys]

    @property
    def num_cond(self) -> int | None:
        """With CFG the batch is [cond; uncond] and the first ``num_cond`` rows are conditional."""
        return None if self.token_ctx is None else self.token_ctx.num_cond

    def operand_quantizers(self) -> dict[str, nn.Module]:
        """The operand quantizers that are set, by attribute name."""
        return {name: q for name in OPERANDS if (q := getattr(self, name)) is not None}

    # ---------------------------------------------------------------- numerics
    @staticmethod
    def _active(quantizer: nn.Module | None) -> bool:
        return quantizer is not None and getattr(quantizer, "enabled", True)

    @staticmethod
    def _apply(quantizer: nn.Module | None, x: torch.Tensor, scale_idx: torch.Tensor | None) -> torch.Tensor:
        if not AttentionOperandQuant._active(quantizer):
            return x
        # Only a per-scale quantizer reads the token scales; the others would just disable their caches with it.
        wants_scales = isinstance(quantizer, FakeQuantizer) and isinstance(quantizer.spec.granularity, PerScale)
        return quantizer(x, scale_idx) if wants_scales else quantizer(x)

    def forward(
        self, q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor,
        attn_bias: torch.Tensor | None, scale: float,
    ) -> torch.Tensor:
        self.calls += 1
        S = k_BHSc.shape[2]
        q_scales_L = self.query_scale_idx()
        k_scales_S = self.key_scale_idx(S, k_BHSc.device)
        q_hat = self._apply(self.q_quantizer, q_BHLc, q_scales_L)
        k_hat = self._apply(self.k_quantizer, k_BHSc, k_scales_S)
        logits_BHLS = torch.matmul(q_hat, k_hat.transpose(-2, -1))
        if scale != 1.0:  # cosine attention (VAR) has scale 1: skip a full pass that changes nothing
            logits_BHLS = logits_BHLS * scale
        if attn_bias is not None:
            logits_BHLS = logits_BHLS + attn_bias.to(logits_BHLS.dtype)
        # softmax in fp32 as SDPA does internally, so an FP16 autocast run is not noisier than the fused kernel
        attn_BHLS = logits_BHLS.float().softmax(dim=-1).to(q_BHLc.dtype)
        if self.skip_single_key and S == 1:
            return torch.matmul(attn_BHLS, v_BHSc)
        attn_hat = self._apply(self.attn_quantizer, attn_BHLS, q_scales_L)
        if self.av_matmul is not None and self._active(self.v_quantizer):
            return self.av_matmul(self, attn_hat, attn_BHLS, v_BHSc)
        v_hat = self._apply(self.v_quantizer, v_BHSc, k_scales_S)
        return torch.matmul(attn_hat, v_hat)

    def extra_repr(self) -> str:
        slot = self.av_matmul is not None
        return f"block_idx={self.block_idx}, skip_single_key={self.skip_single_key}, av_matmul={slot}"
