"""VAR cut into reconstruction stages, and the activations that flow between them (methods.md §3.6).

A *stage* is one piece of the forward pass in registration order: ``word_embed``, then per block ``ada_lin`` →
``attn`` → ``ffn``, then ``head_nm.ada_lin`` → ``head``. Each block-mode unit is one stage; in layer mode the attention
and FFN stages split into one unit per Linear.

A `Stream` holds one model's activations of every calibration row at a stage boundary (the residual stream, the class
condition and the current AdaLN output). Advancing it stage by stage runs each model exactly once over the
calibration set, which is how inputs are captured once instead of re-running the model for every unit.

Attention of the quantized model is replayed scale by scale with the KV cache (as sampling runs it): dynamic K/V
quantizers see only the keys of the scales seen so far. The FP targets come from the masked teacher-forced pass,
which is numerically the same as the cached one for an unquantized model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from varq.quant.model import quant_enabled
from varq.quant.qmodules import QuantLinear

__all__ = ["Stage", "Stream", "stages", "init_stream", "stage_input", "run_stage", "advance", "stage_linears",
           "stage_output_scales", "capture_input", "map_rows", "run_linear", "fp_stage_output",
           "weights_once"]

STAGE_KINDS = ("word_embed", "ada_lin", "attn", "ffn", "head_ada", "head")
ROW_CHUNK = 16  # rows per forward when running a stage over the whole calibration set (bounds attention memory)


@dataclass(frozen=True)
class Stage:
    name: str  # FQN of the stage's module ("blocks.3.attn", "head_nm.ada_lin", …)
    kind: str  # one of STAGE_KINDS
    block_idx: int = -1


@dataclass
class Stream:
    """One model's activations for all N calibration rows at the current stage boundary."""

    cond_ND: torch.Tensor  # class embedding of every row (embeddings stay FP in every method)
    h_NLC: torch.Tensor | None = None  # residual stream
    mod_NKC: torch.Tensor | None = None  # the latest AdaLN output: (N, 6, C) in a block, (N, 2, C) before the head


def stages(var: nn.Module) -> list[Stage]:
    out = [Stage("word_embed", "word_embed")]
    for i in range(len(var.blocks)):
        out += [Stage(f"blocks.{i}.ada_lin", "ada_lin", i), Stage(f"blocks.{i}.attn", "attn", i),
                Stage(f"blocks.{i}.ffn", "ffn", i)]
    return out + [Stage("head_nm.ada_lin", "head_ada"), Stage("head", "head")]


def stage_linears(var: nn.Module, stage: Stage) -> dict[str, QuantLinear]:
    """The stage's QuantLinears with a weight quantizer, by full FQN, in registration order."""
    module = var.get_submodule(stage.name)
    found = {stage.name: module} if isinstance(module, QuantLinear) else {
        f"{stage.name}.{fqn}": m for fqn, m in module.named_modules() if isinstance(m, QuantLinear)
    }
    return {fqn: m for fqn, m in found.items() if m.weight_quantizer is not None}


def stage_output_scales(var: nn.Module, stage: Stage) -> torch.Tensor | None:
    """VAR scale of every output token (L,) or None when a row has no token dim (ada_lin: one vector per row)."""
    if stage.kind in ("ada_lin", "head_ada"):
        return None
    scales_L = var.lvl_1L[0]
    return scales_L[var.first_l:] if stage.kind == "word_embed" else scales_L


def init_stream(var: nn.Module, label_N: torch.Tensor) -> Stream:
    with torch.no_grad():
        return Stream(cond_ND=var.class_emb(label_N).float())


def _block_mod(stream: Stream, k: int) -> torch.Tensor:
    return stream.mod_NKC[:, k].unsqueeze(1)  # (N, 1, C): broadcasts over tokens


@torch.no_grad()
def stage_input(var: nn.Module, stage: Stage, stream: Stream, teacher_NLC: torch.Tensor) -> torch.Tensor:
    """The input of ``stage`` for every row (the AdaLN modulation is FP arithmetic outside every unit)."""
    if stage.kind == "word_embed":
        return teacher_NLC
    if stage.kind == "ada_lin":
        return var.shared_ada_lin(stream.cond_ND)
    if stage.kind == "head_ada":
        return stream.cond_ND
    if stage.kind == "head":
        scale, shift = _block_mod(stream, 0), _block_mod(stream, 1)
        return var.head_nm.ln_wo_grad(stream.h_NLC) * (1 + scale) + shift
    # official chunk order of a block's ada_lin: γ1, γ2, scale1, scale2, shift1, shift2
    block = var.blocks[stage.block_idx]
    k_scale, k_shift = (2, 4) if stage.kind == "attn" else (3, 5)
    return block.ln_wo_grad(stream.h_NLC) * (1 + _block_mod(stream, k_scale)) + _block_mod(stream, k_shift)


@contextlib.contextmanager
def _token_scales(var: nn.Module, scale_idx_L: torch.Tensor | None) -> Iterator[None]:
    # Per-scale (STWQ) input quantizers read the scale of each token from the model's TokenContext.
    ctx = var.token_ctx
    ctx.scale_idx_L, ctx.num_cond = scale_idx_L, None
    try:
        yield
    finally:
        ctx.scale_idx_L = None


def _attn_kv_cached(var: nn.Module, attn: nn.Module, x_BLC: torch.Tensor) -> torch.Tensor:
    # Scale by scale with the cache on, as in sampling: scale k attends to the (quantized, on the fly) K/V of 0..k.
    outs = []
    attn.kv_caching(True)
    try:
        for begin, end in var.begin_ends:
            with _token_scales(var, var.lvl_1L[0, begin:end]):
                outs.append(attn(x_BLC[:, begin:end], attn_bias=None))
    finally:
        attn.kv_caching(False)
    return torch.cat(outs, dim=1)


def run_stage(var: nn.Module, stage: Stage, x: torch.Tensor, kv_cached: bool = True) -> torch.Tensor:
    """The stage's output for input rows ``x`` (gradient mode is the caller's).

    ``kv_cached=False`` runs attention as one masked teacher-forced pass (only meant for an FP model).
    """
    module = var.get_submodule(stage.name)
    if stage.kind == "attn":
        if kv_cached:
            return _attn_kv_cached(var, module, x)
        with _token_scales(var, var.lvl_1L[0]):
            return module(x, attn_bias=var.attn_bias_for_masking.to(x.dtype))
    with _token_scales(var, stage_output_scales(var, stage)):
        return module(x)


class _PrecomputedWeight(nn.Module):
    """Stands in for a weight quantizer for the duration of one unit forward (see `weights_once`)."""

    def __init__(self, w_hat: torch.Tensor) -> None:
        super().__init__()
        self.w_hat = w_hat

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.w_hat


@contextlib.contextmanager
def weights_once(linears: dict[str, QuantLinear]) -> Iterator[None]:
    """Fake-quantize each weight once for a whole unit forward.

    While AdaRound is soft the quantizer cannot cache, and the KV-cached replay calls mat_qkv and proj once per scale
    (10× per step at 256 px); computing the soft weight once keeps one graph node per weight and 1/10 of the work.
    """
    saved = {fqn: m.weight_quantizer for fqn, m in linears.items()}
    try:
        for m in linears.values():
            m.weight_quantizer = _PrecomputedWeight(m.weight_quantizer(m.weight))
        yield
    finally:
        for fqn, m in linears.items():
            m.weight_quantizer = saved[fqn]


def run_linear(var: nn.Module, linear: nn.Module, x: torch.Tensor, scale_idx_L: torch.Tensor | None) -> torch.Tensor:
    """One Linear of a stage alone (layer units), with the token scales its input quantizer may need."""
    with _token_scales(var, scale_idx_L):
        return linear(x)


@torch.no_grad()
def advance(var: nn.Module, stage: Stage, stream: Stream, out: torch.Tensor) -> None:
    """Move ``stream`` past ``stage`` given the stage's output for every row."""
    if stage.kind == "word_embed":
        N = out.shape[0]
        sos_NlC = stream.cond_ND.unsqueeze(1).expand(N, var.first_l, -1) + var.pos_start.expand(N, -1, -1)
        stream.h_NLC = torch.cat((sos_NlC, out), dim=1) + var.lvl_pos_1LC()
    elif stage.kind == "ada_lin":
        stream.mod_NKC = out.view(out.shape[0], 6, -1)
    elif stage.kind == "head_ada":
        stream.mod_NKC = out.view(out.shape[0], 2, -1)
    elif stage.kind in ("attn", "ffn"):
        gamma = _block_mod(stream, 0 if stage.kind == "attn" else 1)
        stream.h_NLC = stream.h_NLC + out * gamma
    # the head's output (logits) ends the pass


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], x_N: torch.Tensor, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """``fn`` over row chunks of ``x_N``, concatenated (no gradients)."""
    with torch.no_grad():
        return torch.cat([fn(x_N[i : i + chunk]) for i in range(0, x_N.shape[0], chunk)])


def capture_input(var: nn.Module, stage: Stage, x_N: torch.Tensor, module: nn.Module, kv_cached: bool) -> torch.Tensor:
    """The input ``module`` (a Linear inside the stage) receives when the stage runs on ``x_N``, for every row."""
    got: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))

    def one_chunk(x: torch.Tensor) -> torch.Tensor:
        got.clear()
        run_stage(var, stage, x, kv_cached)
        return torch.cat(got, dim=1)  # KV-cached attention calls the Linear once per scale

    try:
        return map_rows(one_chunk, x_N)
    finally:
        handle.remove()


@torch.no_grad()
def fp_stage_output(fp_var: nn.Module, stage: Stage, x_N: torch.Tensor) -> torch.Tensor:
    """FP targets of a stage; quantizers of ``fp_var`` (if any) are switched off, so a quantized copy also works."""
    with quant_enabled(fp_var, weights=False, activations=False):
        return map_rows(lambda x: run_stage(fp_var, stage, x, kv_cached=False), x_N)
