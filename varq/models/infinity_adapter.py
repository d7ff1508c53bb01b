"""Infinity's adapter: the structure of `varq.models.infinity.Infinity` as quantizers, calibration and samplers see it.

Everything that names Infinity's submodules (``block_chunks.c.module.j.sa.mat_qkv``, ``ca.mat_kv``,
``shared_ada_lin.1`` …), its scale structure and its two passes lives here (see `varq.models.adapter`).

The condition of a batch is a `TextCond` (precomputed T5 features), where VAR's adapter takes class labels.
AdaLN is shared: one ``shared_ada_lin`` for every block, plus each block's constant ``ada_gss``; so no block has a
modulating Linear of its own, and only the head is an `AdaLNSite` (folding into the shared rows would change every
block at once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from varq.models.adapter import (
    AdaLNSite,
    KVSession,
    LinearSite,
    NextScaleAdapter,
    Stage,
    Stream,
    register_adapter,
)
from varq.models.infinity import Infinity, TextCond
from varq.models.var_blocks import BLOCK_ADALN_CHUNKS, HEAD_ADALN_CHUNKS

__all__ = ["InfinityAdapter", "InfinityKVSession", "InfinityStream", "pack_cross_input", "unpack_cross_input"]

# the Linears of a block by their path inside it, and their kinds
_BLOCK_LINEARS = {
    "sa.mat_qkv": "qkv", "sa.proj": "attn_out", "ca.mat_q": "cross_q", "ca.mat_kv": "cross_kv",
    "ca.proj": "cross_out", "ffn.fc1": "ffn_up", "ffn.fc2": "ffn_down",
}
_OUTER_LINEARS = {
    "word_embed": "embed", "shared_ada_lin.1": "adaln", "head_nm.ada_lin.1": "head_adaln", "head": "head",
    "text_proj_for_ca.0": "text", "text_proj_for_ca.2": "text", "text_proj_for_sos.ca.mat_kv": "text",
    "text_proj_for_sos.ca.proj": "text",
}
# whose input tokens are the image token sequence (word_embed skips the start token; text Linears see text tokens)
_TOKEN_ALIGNED = ("qkv", "attn_out", "cross_q", "cross_out", "ffn_up", "ffn_down", "head")
_BLOCK_RE = re.compile(r"^(blocks\.(\d+)|block_chunks\.(\d+)\.module\.(\d+))\.(.+)$")
_HEAD_CHUNK = {name: i for i, name in enumerate(HEAD_ADALN_CHUNKS)}


def _is_linear(module: nn.Module) -> bool:
    # a QuantLinear (varq.quant.qmodules) keeps the Linear's in/out features and weight; both count
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "weight"))


class InfinityKVSession(KVSession):
    """One batch of Infinity's scale-by-scale inference (see `KVSession`); created by `InfinityAdapter.kv_session`.

    Each step rotates its queries and keys by its own scale's positions and adds its own scale embedding.
    """

    def __init__(self, adapter: InfinityAdapter, text: TextCond, num_cond: int | None, static: bool):
        model = adapter.model
        self.adapter, self.model, self.num_cond = adapter, model, num_cond
        self.num_scales = len(model.patch_nums)
        self.ctx = model.encode_text(text)
        self.mods, self.head_mod = model.modulations(self.ctx.cond_BD) if static else (None, None)
        self.ca_kvs = [block.ca.kv(self.ctx.ca_BLtD) for block in model.block_list()] if static else None

    def first_input(self) -> torch.Tensor:
        return self.model.sos(self.ctx.cond_BD)

    def step(self, si: int, x_BlC: torch.Tensor) -> torch.Tensor:
        model = self.model
        begin, end = model.begin_ends[si]
        lvl_11C = model.lvl_embed.weight[si].view(1, 1, -1)
        with self.adapter.token_context(self.adapter.token_scale_L[begin:end], self.num_cond):
            h_BlC = model.run_blocks(
                x_BlC, self.ctx, lvl_11C, None, model.rope_2Lh[:, begin:end], self.mods, self.ca_kvs,
            )
            return model.get_logits(h_BlC, self.ctx.cond_BD, self.head_mod)

    def embed(self, si: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        return self.model.word_embed(x_BlCv.to(self.model.word_embed.weight.dtype))


@register_adapter("infinity")
class InfinityAdapter(NextScaleAdapter):
    session_class = InfinityKVSession
    model: Infinity

    # ------------------------------------------------------------------ structure
    def _block_index(self, fqn: str) -> tuple[int, str] | None:
        m = _BLOCK_RE.match(fqn)
        if m is None:
            return None
        if m.group(2) is not None:
            return int(m.group(2)), m.group(5)
        per = self.model.arch.depth // self.model.arch.block_chunks
        return int(m.group(3)) * per + int(m.group(4)), m.group(5)

    def linears(self) -> list[LinearSite]:
        sites = []
        for fqn, module in self.model.named_modules():
            if not _is_linear(module):
                continue
            found = self._block_index(fqn)
            if found is not None:
                block_idx, rest = found
                kind = _BLOCK_LINEARS.get(rest)
            else:
                block_idx, kind = -1, _OUTER_LINEARS.get(fqn)
            if kind is not None:
                sites.append(LinearSite(fqn, kind, block_idx, token_aligned=kind in _TOKEN_ALIGNED))
        return sites

    @property
    def num_blocks(self) -> int:
        return self.model.depth

    def attention_modules(self) -> dict[int, nn.Module]:
        """Each block's self-attention (the KV-cached one; cross-attention to ≤ 512 text keys stays explicit)."""
        return {i: block.sa for i, block in enumerate(self.model.block_list())}

    def last_block(self) -> nn.Module:
        return self.model.block_list()[-1]

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    @property
    def head_dim(self) -> int:
        return self.model.C // self.model.num_heads

    def adaln_sites(self) -> dict[str, AdaLNSite]:
        return {
            "head": AdaLNSite(
                "head", "head_nm.ada_lin.1", _HEAD_CHUNK["scale"], _HEAD_CHUNK["shift"], len(HEAD_ADALN_CHUNKS),
                skips_sink=False,
            )
        }

    # ------------------------------------------------------------------ cost (one CFG pair, KV-cached sampling)
    def linear_rows_per_pair(self, site: LinearSite) -> int:
        tokens = list(self.model.schedule.lengths)
        text_rows = 2 * self.model.arch.text_maxlen  # an upper bound: real prompts are shorter
        if site.kind == "embed":  # the next input is embedded once and repeated for both halves
            return sum(tokens[1:])
        if site.kind in ("adaln", "head_adaln"):  # one condition row per half, per scale
            return 2 * len(tokens)
        if site.kind in ("cross_kv", "text"):  # the text is projected once per batch
            return text_rows
        return 2 * sum(tokens)

    # ------------------------------------------------------------------ passes
    def teacher_forward(
        self, text: TextCond, x_BLCv: torch.Tensor, num_cond: int | None = None, masked: bool = True,
    ) -> torch.Tensor:
        return self.model(text, x_BLCv, num_cond=num_cond, masked=masked)

    def modulation_roots(self) -> list[nn.Module]:
        m = self.model
        return [m.shared_ada_lin, m.head_nm.ada_lin] + [block.ca.mat_kv for block in m.block_list()]

    # ------------------------------------------------------------------ reconstruction stages
    def stages(self) -> list[Stage]:
        """word_embed, shared_ada_lin, then per block sa → ca → ffn, then the head's AdaLN and the head.

        The text projections stay outside every stage (their Linears are quantized but not reconstructed).
        """
        m = self.model
        out = [Stage("word_embed", "embed"), Stage("shared_ada_lin", "adaln")]
        for i in range(self.num_blocks):
            fqn = m.block_fqn(i)
            out += [Stage(f"{fqn}.sa", "attn", i), Stage(f"{fqn}.ca", "cross", i), Stage(f"{fqn}.ffn", "ffn", i)]
        return out + [Stage("head_nm.ada_lin", "head_adaln"), Stage("head", "head")]

    @torch.no_grad()
    def init_stream(self, text_N: TextCond) -> InfinityStream:
        ctx = self.model.encode_text(text_N)
        return InfinityStream(
            cond_ND=ctx.cond_BD.float(), ca_NLtD=ctx.ca_BLtD, key_mask_NLt=ctx.key_mask_B11Lt[:, 0, 0],
        )

    def _block_mod(self, stream: InfinityStream, block_idx: int) -> torch.Tensor:
        return self.model.block_list()[block_idx].modulation(stream.mod_NKC.unsqueeze(1))

    @torch.no_grad()
    def stage_input(self, stage: Stage, stream: InfinityStream, teacher_NLC: torch.Tensor) -> torch.Tensor:
        m = self.model
        if stage.kind == "embed":
            return teacher_NLC
        if stage.kind in ("adaln", "head_adaln"):
            return stream.cond_ND
        if stage.kind == "head":
            return m.head_nm.modulated(stream.h_NLC, stream.mod_NKC.unsqueeze(1))
        block = m.block_list()[stage.block_idx]
        if stage.kind == "cross":
            return pack_cross_input(block.ca_norm(stream.h_NLC), stream.ca_NLtD, stream.key_mask_NLt)
        return block.branch_input(stage.kind, stream.h_NLC, self._block_mod(stream, stage.block_idx))

    def _attn_kv_cached(self, sa: nn.Module, x_BLC: torch.Tensor) -> torch.Tensor:
        # scale by scale with the cache on, as in sampling, each scale rotated by its own positions
        m, outs, scales_L = self.model, [], self.token_scale_L
        sa.kv_caching(True)
        try:
            for begin, end in m.begin_ends:
                with self.token_context(scales_L[begin:end]):
                    outs.append(sa(x_BLC[:, begin:end], None, m.rope_2Lh[:, begin:end]))
        finally:
            sa.kv_caching(False)
        return torch.cat(outs, dim=1)

    def run_stage(self, stage: Stage, x: torch.Tensor, kv_cached: bool = True) -> torch.Tensor:
        """The stage's output for input rows ``x`` (gradient mode is the caller's).

        ``kv_cached=False`` runs self-attention as one masked teacher-forced pass (only meant for an FP model).
        """
        m = self.model
        module = m.get_submodule(stage.name)
        if stage.kind == "attn":
            if kv_cached:
                return self._attn_kv_cached(module, x)
            with self.token_context(self.token_scale_L):
                return module(x, m.attn_bias_for_masking.to(x.dtype), m.rope_2Lh)
        if stage.kind == "cross":
            img_NLC, text_NLtD, key_mask = unpack_cross_input(x, m.L)
            with self.token_context(self.token_scale_L):
                return module(img_NLC, text_NLtD, key_mask)
        with self.token_context(self.stage_output_scales(stage)):
            return module(x)

    def _enter_block(self, stream: InfinityStream, block_idx: int) -> None:
        m = self.model
        if block_idx < m.depth and m.lvl_embedded_before(block_idx):
            stream.h_NLC = stream.h_NLC + m.lvl_embed(m.lvl_1L)

    @torch.no_grad()
    def advance(self, stage: Stage, stream: InfinityStream, out: torch.Tensor) -> None:
        """Move ``stream`` past ``stage`` given the stage's output for every row."""
        m = self.model
        N = out.shape[0]
        if stage.kind == "embed":
            stream.h_NLC = torch.cat((m.sos(stream.cond_ND), out), dim=1)
            self._enter_block(stream, 0)
        elif stage.kind == "adaln":
            stream.mod_NKC = out.reshape(N, len(BLOCK_ADALN_CHUNKS), -1)
        elif stage.kind == "head_adaln":
            stream.mod_NKC = out.reshape(N, len(HEAD_ADALN_CHUNKS), -1)
        elif stage.kind == "cross":
            stream.h_NLC = m.block_list()[stage.block_idx].add_branch("cross", stream.h_NLC, out, None)
        elif stage.kind in ("attn", "ffn"):
            block = m.block_list()[stage.block_idx]
            stream.h_NLC = block.add_branch(stage.kind, stream.h_NLC, out, self._block_mod(stream, stage.block_idx))
            if stage.kind == "ffn":
                self._enter_block(stream, stage.block_idx + 1)
        # the head's output (logits) ends the pass


@dataclass
class InfinityStream(Stream):
    """`Stream` plus what cross-attention needs of every row: its text source tokens and which of them are real.

    ``cond_ND`` is the pooled text vector; ``mod_NKC`` the shared AdaLN output (N, 6, C) inside the blocks and the
    head's (N, 2, C) after them.
    """

    ca_NLtD: torch.Tensor | None = None
    key_mask_NLt: torch.Tensor | None = None


def pack_cross_input(img_NLC: torch.Tensor, ca_NLtD: torch.Tensor, key_mask_NLt: torch.Tensor) -> torch.Tensor:
    """One tensor per row for the cross-attention stage: (N, L + Lt, C + 1), image tokens then text tokens.

    Reconstruction draws random rows of a stage's input, so each row must carry its own text; the last channel is
    1 for a real text token and 0 elsewhere.
    """
    N, L, _ = img_NLC.shape
    img = torch.cat((img_NLC, img_NLC.new_zeros(N, L, 1)), dim=-1)
    text = torch.cat((ca_NLtD.to(img_NLC.dtype), key_mask_NLt.to(img_NLC.dtype).unsqueeze(-1)), dim=-1)
    return torch.cat((img, text), dim=1)


def unpack_cross_input(x: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_cross_input`: image tokens (N, L, C), text (N, Lt, C), key mask (N, 1, 1, Lt) bool."""
    key_mask = x[:, L:, -1] > 0.5
    return x[:, :L, :-1], x[:, L:, :-1], key_mask.view(x.shape[0], 1, 1, -1)
