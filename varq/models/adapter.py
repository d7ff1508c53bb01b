"""The model-adapter contract: the one place that knows a model family's structure.

``varq.quant``, ``varq.calib`` and the samplers see a model only through ``adapter_for(model)``
(`varq.models.lookup`); they never name its submodules. A new family (Infinity, RAR, …) is one module
``varq/models/<family>_adapter.py`` plus its configs:

* the model class carries ``family = "<family>"``;
* the module defines a `ModelAdapter` subclass decorated with ``@register_adapter("<family>")`` providing:

  structure
    - ``linears()``: every quantizable Linear as a `LinearSite` (FQN, kind from `LINEAR_KINDS`, block index,
      whether its input tokens are the model's token sequence), in forward order;
    - ``attention_modules()``: each block's attention module (with an ``operand_quant`` slot, see
      ``varq.quant.attention``) by block index;
    - ``adaln_sites()``: the Linears fed by an AdaLN modulation, as `AdaLNSite`s (the modulating Linear's chunk rows,
      and where an output-bias compensation goes when the consumer has no bias of its own);
    - ``token_scale_L``: the scale of every token of the full sequence (L,), and ``scale_bounds``: (begin, end) of
      every scale;
    - ``token_ctx``: the model's `TokenContext` (quantizers keep a reference to it);

  cost
    - ``linear_rows_per_pair(site)`` and ``attention_macs_per_pair(block_idx)``: rows a Linear processes and
      attention MACs per CFG pair of a KV-cached sampling run (BitOPs);

  passes
    - ``teacher_forward(label_B, x_BLCv, num_cond, masked)``: logits (B, L, V) fp32 of the full-sequence pass;
    - ``kv_session(label_B, num_cond, static_modulation, preallocate)``: a context manager yielding a `KVSession`,
      the per-scale KV-cached step generator every sampler and replay runs;
    - ``token_context(scale_idx_L, num_cond)``: the only writer of per-call token context (a context manager);

  reconstruction
    - ``stages()``: the forward pass cut into `Stage`s in order; ``init_stream``, ``stage_input``, ``run_stage``,
      ``advance`` and ``stage_output_scales`` move a `Stream` of activations through them (``varq.quant.recon``).

The methods and quantizers refer to layers by `LinearSite.kind` or by FQN globs given in configs, never by
hard-coded names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LINEAR_KINDS", "TEXT_LINEAR_KINDS", "STAGE_KINDS", "TEXT_STAGE_KINDS", "LinearSite", "AdaLNSite", "Stage",
    "Stream", "TokenContext", "KVSession", "ModelAdapter", "register_adapter", "REGISTERED",
]

# embed: token embedding of the inputs; adaln / head_adaln: the modulation Linears of a block / of the head;
# qkv, attn_out, ffn_up, ffn_down: the block's projections; head: the output projection to logits
LINEAR_KINDS = ("embed", "adaln", "qkv", "attn_out", "ffn_up", "ffn_down", "head_adaln", "head")
# the further kinds of text-conditioned families (Infinity): a block's cross-attention to the text (its query,
# key/value and output projections) and the projections of the text features outside the blocks
TEXT_LINEAR_KINDS = ("cross_q", "cross_kv", "cross_out", "text")
# embed, then per block adaln → attn → ffn, then head_adaln → head
STAGE_KINDS = ("embed", "adaln", "attn", "ffn", "head_adaln", "head")
# text-conditioned families: a block's cross-attention to the text, between its attn and ffn stages
TEXT_STAGE_KINDS = ("cross",)


@dataclass(frozen=True)
class LinearSite:
    fqn: str
    kind: str  # one of LINEAR_KINDS
    block_idx: int = -1  # -1 outside the blocks
    token_aligned: bool = True  # its input tokens are the model's token sequence (False: a skipped or no token dim)


@dataclass(frozen=True)
class AdaLNSite:
    """A Linear whose input is an AdaLN output X = LN(x)·(1 + scale) + shift, and the rows that produce it."""

    fqn: str  # the consumer Linear
    ada_lin_fqn: str  # its modulating Linear
    scale_chunk: int  # chunk of the ada_lin output holding `scale`
    shift_chunk: int
    num_chunks: int
    skips_sink: bool  # PTQ4ARVG takes this site's statistics without the sink token (it gets its own STWQ range)
    # the consumer has no bias: its output-bias compensation is split in equal parts over these parameters/buffers
    bias_fqns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str  # FQN of the stage's module
    kind: str  # one of STAGE_KINDS
    block_idx: int = -1


@dataclass
class Stream:
    """One model's activations for all N calibration rows at the current stage boundary."""

    cond_ND: torch.Tensor  # condition of every row (embeddings stay FP in every method)
    h_NLC: torch.Tensor | None = None  # residual stream
    mod_NKC: torch.Tensor | None = None  # the latest AdaLN output, (N, chunks, C)


class TokenContext:
    """What the tokens of the current forward pass are, for quantizers that depend on it.

    ``scale_idx_L``: the scale of every query token in the current input (teacher forcing: all L tokens; KV-cached
    inference: the tokens of one scale). ``num_cond``: with CFG the batch is [cond; uncond] and the first
    ``num_cond`` rows are conditional; None when the batch is not a CFG pair. Written only through `scope`.
    """

    def __init__(self) -> None:
        self.scale_idx_L: torch.Tensor | None = None
        self.num_cond: int | None = None

    @contextlib.contextmanager
    def scope(self, scale_idx_L: torch.Tensor | None, num_cond: int | None = None) -> Iterator[TokenContext]:
        """Set the context for the calls inside the block; the previous one comes back on exit (nesting is safe)."""
        saved = self.scale_idx_L, self.num_cond
        self.scale_idx_L, self.num_cond = scale_idx_L, num_cond
        try:
            yield self
        finally:
            self.scale_idx_L, self.num_cond = saved


class KVSession:
    """Scale-by-scale KV-cached inference of one batch, the steps every sampler and replay runs.

    ``first_input()`` gives the first scale's input tokens; ``step(si, x)`` runs scale ``si`` on its input tokens
    (attending to every cached coarser scale) and returns its logits fp32; ``embed(si, x_BlCv)`` turns scale
    ``si``'s token features into that scale's input. The family's adapter implements it.
    """

    num_scales: int

    def first_input(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self, si: int, x_BlC: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, si: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModelAdapter:
    """Base of every family's adapter (see the module docstring for what a family provides)."""

    family: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def token_ctx(self) -> TokenContext:
        return self.model.token_ctx

    def token_context(self, scale_idx_L: torch.Tensor | None, num_cond: int | None = None):
        return self.token_ctx.scope(scale_idx_L, num_cond)

    def linear_sites(self) -> dict[str, LinearSite]:
        return {site.fqn: site for site in self.linears()}

    # the rest is the family's
    def linears(self) -> list[LinearSite]:
        raise NotImplementedError

    def last_block(self) -> nn.Module:
        """The transformer block whose output is the last hidden state (B, L, C), before the head's norm."""
        raise NotImplementedError


class NextScaleAdapter(ModelAdapter):
    """The scale structure every next-scale model shares, read from the attributes both VAR and Infinity carry:
    ``lvl_1L`` (scale of every token), ``begin_ends`` (token range of every scale), ``first_l`` (tokens of the first
    scale). A family adapter adds ``num_heads`` / ``head_dim`` and everything structural."""

    num_heads: int
    head_dim: int

    @property
    def token_scale_L(self) -> torch.Tensor:
        return self.model.lvl_1L[0]

    @property
    def scale_bounds(self) -> list[tuple[int, int]]:
        return list(self.model.begin_ends)

    @property
    def num_scales(self) -> int:
        return len(self.model.begin_ends)

    @property
    def sink_tokens(self) -> int:
        """Tokens of the first scale (the condition's start token, the attention sink)."""
        return self.model.first_l

    session_class: type  # the family's `KVSession`: (adapter, condition, num_cond, static_modulation)

    def modulation_roots(self) -> list[nn.Module]:
        """The modules whose output depends only on the condition (AdaLN Linears, text K/V): the same at every scale."""
        return []

    def modulation_is_static(self) -> bool:
        """Whether the `modulation_roots` may run once per batch: nothing observes or hooks them (a calibration
        observer or a forward hook expects one call per scale, so then the per-scale calls stay)."""
        for root in self.modulation_roots():
            for m in root.modules():
                if m._forward_hooks or m._forward_pre_hooks or getattr(m, "observing", False):
                    return False
        return True

    @contextlib.contextmanager
    def kv_session(
        self, cond, num_cond: int | None = None, *, static_modulation: bool = False, preallocate: bool = False,
    ) -> Iterator[KVSession]:
        """KV cache on for one batch of conditions ``cond`` (the full CFG batch); off again on exit.

        ``static_modulation``: compute the AdaLN modulations once (when `modulation_is_static`: nothing observes
        them per call); ``preallocate``: KV buffers of the full length written by slices (inference only). Neither
        changes a value.
        """
        model = self.model
        model.set_kv_caching(True, model.L if preallocate else None)
        try:
            yield self.session_class(self, cond, num_cond, static_modulation and self.modulation_is_static())
        finally:
            model.set_kv_caching(False)

    def stage_output_scales(self, stage: Stage) -> torch.Tensor | None:
        """Scale of every output token (L,), or None when a row has no token dim (AdaLN: one vector per row); the
        input embedding covers every scale but the first (whose tokens come from the condition)."""
        if stage.kind in ("adaln", "head_adaln"):
            return None
        scales_L = self.token_scale_L
        return scales_L[self.sink_tokens :] if stage.kind == "embed" else scales_L

    def attention_macs_per_pair(self, block_idx: int) -> float:
        """QKᵀ (or Â·V) MACs of one block's self-attention over a KV-cached sampling run: 2·H·l_k·S_k·c summed
        over the scales (l_k tokens at scale k attend to the S_k tokens of scales 0..k, for both CFG halves)."""
        H, c = self.num_heads, self.head_dim
        return float(sum(2 * H * (end - begin) * end * c for begin, end in self.scale_bounds))


REGISTERED: dict[str, type[ModelAdapter]] = {}


def register_adapter(family: str):
    def decorate(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        if family in REGISTERED and REGISTERED[family] is not cls:
            raise ValueError(f"model family '{family}' has two adapters")
        REGISTERED[family] = cls
        cls.family = family
        return cls

    return decorate
