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

``query_chunk`` bounds memory at large scales (Infinity's 64² tokens per scale): the query rows are processed in
chunks of that many, so the (B, H, L, S) attention matrix never exists whole, only (B, H, query_chunk, S) slices.
Q and K are quantized once before chunking and V once for all chunks; the softmax quantizer then sees one chunk at a
time, which is exact when its ranges are per query row or fixed (dynamic `PerToken`/`PerGroup`, or a frozen static
quantizer) and refused otherwise. An ``av_matmul`` supports chunks through ``forward_chunked``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from varq.quant.granularity import PerAxes, PerGroup, PerScale, PerToken
from varq.quant.quantizer import FakeQuantizer

__all__ = ["AttentionOperandQuant", "AVMatmul", "AttentionRows", "OPERANDS", "query_chunks", "set_query_chunk", "write_rows"]

# the fewest query rows one chunk may have (see `query_chunks`)
MIN_QUERY_CHUNK = 3

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


# Chunked passes hand an ``av_matmul`` this instead of the whole matrices: (rows, quantize) → (FP softmax, quantized
# softmax or None when ``quantize`` is False) of those query rows over every key, (B, H, rows, S) each, recomputed on
# every call.
AttentionRows = Callable[[slice, bool], tuple[torch.Tensor, torch.Tensor | None]]


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
        query_chunk: process at most this many query rows at a time (same result, peak memory of one
            (B, H, query_chunk, S) slice instead of the whole attention matrix); None: all rows at once.
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
        query_chunk: int | None = None,
    ):
        super().__init__()
        self.query_chunk = _check_query_chunk(query_chunk)
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
    def _quantize(quantizer: nn.Module | None, x: torch.Tensor, scale_idx: torch.Tensor | None) -> torch.Tensor:
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
        q_hat = self._quantize(self.q_quantizer, q_BHLc, q_scales_L)
        k_hat = self._quantize(self.k_quantizer, k_BHSc, k_scales_S)
        L = q_BHLc.shape[2]
        if self.query_chunk is not None and L > self.query_chunk and not (self.skip_single_key and S == 1):
            return self._forward_chunked(q_hat, k_hat, v_BHSc, attn_bias, scale, q_scales_L, k_scales_S)
        attn_BHLS = _softmax(q_hat, k_hat, attn_bias, scale, q_BHLc.dtype)
        if self.skip_single_key and S == 1:
            return torch.matmul(attn_BHLS, v_BHSc)
        attn_hat = self._quantize(self.attn_quantizer, attn_BHLS, q_scales_L)
        if self.av_matmul is not None and self._active(self.v_quantizer):
            return self.av_matmul(self, attn_hat, attn_BHLS, v_BHSc)
        v_hat = self._quantize(self.v_quantizer, v_BHSc, k_scales_S)
        return torch.matmul(attn_hat, v_hat)

    def _forward_chunked(
        self, q_hat: torch.Tensor, k_hat: torch.Tensor, v_BHSc: torch.Tensor, attn_bias: torch.Tensor | None,
        scale: float, q_scales_L: torch.Tensor | None, k_scales_S: torch.Tensor | None,
    ) -> torch.Tensor:
        self._check_row_local()
        L, dtype = q_hat.shape[2], q_hat.dtype
        # a (…, L, S) bias (the block-causal mask) is sliced with the rows; a (…, 1, S) one broadcasts as it is
        bias_rows = attn_bias is not None and attn_bias.ndim >= 2 and attn_bias.shape[-2] == L

        def rows_fn(rows: slice, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
            bias = attn_bias[..., rows, :] if bias_rows else attn_bias  # type: ignore[index]
            attn = _softmax(q_hat[:, :, rows], k_hat, bias, scale, dtype)
            if not quantize:
                return attn, None
            scales = None if q_scales_L is None else q_scales_L[rows]
            return attn, self._quantize(self.attn_quantizer, attn, scales)

        if self.av_matmul is not None and self._active(self.v_quantizer):
            chunked = getattr(self.av_matmul, "forward_chunked", None)
            if chunked is None:
                raise ValueError(
                    f"block {self.block_idx}: query_chunk is set but the av_matmul {type(self.av_matmul).__name__} "
                    f"has no forward_chunked; set query_chunk=None"
                )
            return chunked(self, rows_fn, v_BHSc, L, self.query_chunk)
        v_hat = self._quantize(self.v_quantizer, v_BHSc, k_scales_S)
        chunks = query_chunks(L, self.query_chunk)  # type: ignore[arg-type]
        outs = [torch.matmul(rows_fn(rows)[1], v_hat) for rows in chunks]  # type: ignore[arg-type]
        return write_rows(outs)

    def _check_row_local(self) -> None:
        # A chunk of rows gets the same quantization as in the whole matrix only if no range spans several rows.
        q = self.attn_quantizer
        if not self._active(q):
            return
        if isinstance(q, FakeQuantizer):
            if not q.observing and (not q.spec.dynamic or _per_row(q.spec.granularity)):
                return
            what = "is calibrating (observing)" if q.observing else f"has dynamic {q.spec.granularity} ranges"
        else:
            what = f"is a {type(q).__name__}, not a FakeQuantizer"
        raise ValueError(
            f"block {self.block_idx}: query_chunk needs a softmax quantizer whose ranges are per query row or fixed, "
            f"but it {what}; set query_chunk=None for this pass"
        )

    def extra_repr(self) -> str:
        slot = self.av_matmul is not None
        return (
            f"block_idx={self.block_idx}, skip_single_key={self.skip_single_key}, av_matmul={slot}, "
            f"query_chunk={self.query_chunk}"
        )


def _softmax(
    q_hat: torch.Tensor, k_hat: torch.Tensor, attn_bias: torch.Tensor | None, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    logits = torch.matmul(q_hat, k_hat.transpose(-2, -1))
    if scale != 1.0:  # cosine attention (VAR) has scale 1: skip a full pass that changes nothing
        logits = logits * scale
    if attn_bias is not None:
        logits = logits + attn_bias.to(logits.dtype)
    # softmax in fp32 as SDPA does internally, so an FP16 autocast run is not noisier than the fused kernel
    logits = logits.float()
    if logits.device.type == "cpu" and not torch.is_grad_enabled():
        # In place on the fresh logits: the last-dim kernel finishes reading a row before it writes it, so the
        # values are the same, and a CPU pays page faults for every fresh (B, H, L, S) tensor (49 → 18 ms for
        # 22M entries, one thread). CUDA's caching allocator has no such cost, and autograd needs the logits.
        return torch._softmax(logits, -1, False, out=logits).to(dtype)
    return logits.softmax(dim=-1).to(dtype)


def _per_row(granularity) -> bool:
    # ranges of a (B, H, L, S) softmax that never span two query rows (dim 2)
    if isinstance(granularity, (PerToken, PerGroup)):
        return True
    return isinstance(granularity, PerAxes) and {d % 4 for d in granularity.keep} >= {0, 1, 2}


def query_chunks(num_rows: int, chunk: int) -> list[slice]:
    """Consecutive row slices covering ``range(num_rows)``: ``chunk`` rows each, the last one up to ``chunk + 2``.

    A tail of one or two rows is merged into the chunk before it: one- and two-row matmuls take other BLAS kernels
    (matrix-vector, and MKL's two-row path) whose sums differ in the last bits from those that compute the same rows
    of the whole matrix, and a log2 softmax grid can turn that last bit into another code.
    """
    starts = list(range(0, num_rows, chunk))
    if len(starts) > 1 and num_rows - starts[-1] < MIN_QUERY_CHUNK:
        starts.pop()
    return [slice(b, e) for b, e in zip(starts, starts[1:] + [num_rows])]


def write_rows(outs: list[torch.Tensor]) -> torch.Tensor:
    """Consecutive (B, H, rows, c) chunk outputs as one (B, H, L, c) tensor."""
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _check_query_chunk(query_chunk: int | None) -> int | None:
    if query_chunk is not None and (
        isinstance(query_chunk, bool) or int(query_chunk) != query_chunk or query_chunk < MIN_QUERY_CHUNK
    ):
        # smaller chunks would run the one- and two-row BLAS kernels, whose sums differ from the unchunked pass's
        raise ValueError(
            f"query_chunk must be an integer >= {MIN_QUERY_CHUNK} (query rows per chunk) or None, got {query_chunk!r}"
        )
    return None if query_chunk is None else int(query_chunk)


def set_query_chunk(var: nn.Module, query_chunk: int | None) -> int:
    """Set ``query_chunk`` on every `AttentionOperandQuant` of a quantized model; returns how many were set."""
    chunk = _check_query_chunk(query_chunk)
    modules = [m for m in var.modules() if isinstance(m, AttentionOperandQuant)]
    for m in modules:
        m.query_chunk = chunk
    return len(modules)
