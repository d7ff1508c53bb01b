"""Infinity: text-conditioned bitwise next-scale prediction, one class for every size (2B, 125M, 8B, tiny tests).

The model consumes PRECOMPUTED text features (a `TextCond`: padded T5 features and per-row lengths); the text
encoder lives elsewhere. The BSQ tokenizer is not a submodule (as in the official code, so the state-dict keys match
``infinity_2b_reg.pth``). Logits are (B, L, 2·d): two logits per bit of each token's d-bit code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from varq.models.adapter import TokenContext
from varq.models.infinity_blocks import CrossAttnBlock, RMSNorm, TextAttentivePool, text_key_mask
from varq.models.infinity_scales import ScaleSchedule, custom_schedule, rope_table, schedule_for
from varq.models.var_blocks import BLOCK_ADALN_CHUNKS, AdaLNBeforeHead

__all__ = ["InfinityArch", "INFINITY_ARCHS", "TextCond", "TextContext", "Infinity", "build_infinity"]


@dataclass(frozen=True)
class InfinityArch:
    depth: int
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    text_channels: int = 2048  # T5 feature width (Flan-T5-XL: 2048)
    text_maxlen: int = 512  # rows of the learned unconditional text (cfg_uncond)
    codebook_dim: int = 32  # bits per token of the BSQ tokenizer
    block_chunks: int = 1  # the checkpoints group blocks as block_chunks.{c}.module.{j}
    norm_eps: float = 1e-6
    lvl_embed_first_chunk_only: bool = True  # the released models add the scale embedding before chunk 0 only
    num_lvl: int = 15  # rows of lvl_embed


# keyed by the model config name
INFINITY_ARCHS = {
    "infinity_2b": InfinityArch(depth=32, width=2048, num_heads=16, block_chunks=8),
    "infinity_125m": InfinityArch(depth=12, width=768, num_heads=8, block_chunks=4),
    "infinity_8b": InfinityArch(depth=40, width=3584, num_heads=28, block_chunks=8),
    # random weights, the same key pattern, small enough for CPU tests
    "infinity_tiny": InfinityArch(depth=4, width=256, num_heads=2, text_channels=256, text_maxlen=32, block_chunks=2),
}


@dataclass
class TextCond:
    """Text condition of a batch: T5 features of the real tokens, padded to (B, Lt, Ct), and their counts (B,)."""

    features_BLtC: torch.Tensor
    lens_B: torch.Tensor

    def __post_init__(self) -> None:
        if self.features_BLtC.ndim != 3 or self.lens_B.shape != self.features_BLtC.shape[:1]:
            raise ValueError(
                f"text features must be (B, Lt, C) with lengths (B,), got {tuple(self.features_BLtC.shape)} and "
                f"{tuple(self.lens_B.shape)}"
            )
        if len(self.lens_B) and (int(self.lens_B.min()) < 1 or int(self.lens_B.max()) > self.features_BLtC.shape[1]):
            raise ValueError(f"text lengths must lie in [1, {self.features_BLtC.shape[1]}], got {self.lens_B.tolist()}")

    @property
    def batch_size(self) -> int:
        return self.features_BLtC.shape[0]

    @property
    def shape(self) -> torch.Size:
        """(B,), as the label tensor of a class-conditional batch: code that counts rows works for both."""
        return self.lens_B.shape

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str) -> TextCond:
        return TextCond(self.features_BLtC.to(device), self.lens_B.to(device))

    @staticmethod
    def cat(conds: Sequence[TextCond]) -> TextCond:
        Lt = max(c.features_BLtC.shape[1] for c in conds)
        dtype = conds[0].features_BLtC.dtype
        feats = [nn.functional.pad(c.features_BLtC.to(dtype), (0, 0, 0, Lt - c.features_BLtC.shape[1])) for c in conds]
        return TextCond(torch.cat(feats), torch.cat([c.lens_B for c in conds]))


@dataclass
class TextContext:
    """What the blocks need from the text: the pooled vector, each token's cross-attention source, the key mask."""

    cond_BD: torch.Tensor
    ca_BLtD: torch.Tensor
    key_mask_B11Lt: torch.Tensor


class BlockChunk(nn.Module):
    """A group of consecutive blocks (only a naming level of the checkpoints: ``block_chunks.{c}.module.{j}``)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class Infinity(nn.Module):
    family = "infinity"  # its structure is declared in varq.models.infinity_adapter

    def __init__(self, arch: InfinityArch, schedule: ScaleSchedule | None = None, cond_drop_rate: float = 0.0):
        super().__init__()
        if arch.depth % arch.block_chunks:
            raise ValueError(f"depth {arch.depth} is not divisible by block_chunks {arch.block_chunks}")
        self.arch = arch
        C, Ct = arch.width, arch.text_channels
        self.C = self.D = C
        self.depth, self.num_heads, self.Cvae = arch.depth, arch.num_heads, arch.codebook_dim
        self.V = 2 * arch.codebook_dim
        self.cond_drop_rate = cond_drop_rate
        self.first_l = 1
        self.token_ctx = TokenContext()
        init_std = math.sqrt(1 / C / 3)

        cfg_uncond = torch.empty(arch.text_maxlen, Ct)
        nn.init.trunc_normal_(cfg_uncond, std=1.2)
        self.cfg_uncond = nn.Parameter(cfg_uncond / Ct**0.5)
        self.text_norm = RMSNorm(Ct, eps=arch.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))

        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.lvl_embed = nn.Embedding(arch.num_lvl, C)
        for p in (self.pos_start, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, std=init_std)
        self.word_embed = nn.Linear(arch.codebook_dim, C)
        # a plain Linear (the official one is a subclass that views its output; `modulations` views it instead), so
        # a quantized-Linear swap that matches nn.Linear exactly does not miss it
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, len(BLOCK_ADALN_CHUNKS) * C))

        blocks = [CrossAttnBlock(C, arch.num_heads, arch.mlp_ratio, arch.norm_eps) for _ in range(arch.depth)]
        if arch.block_chunks == 1:
            self.blocks = nn.ModuleList(blocks)
        else:
            per = arch.depth // arch.block_chunks
            self.block_chunks = nn.ModuleList(BlockChunk(blocks[i : i + per]) for i in range(0, arch.depth, per))
        self.head_nm = AdaLNBeforeHead(C, C, arch.norm_eps)
        self.head = nn.Linear(C, self.V)
        self.set_schedule(schedule or schedule_for(1.0, "0.06M"))

    # ------------------------------------------------------------------ structure
    def block_list(self) -> list[CrossAttnBlock]:
        """Every block in forward order, whatever the chunking."""
        if self.arch.block_chunks == 1:
            return list(self.blocks)
        return [block for chunk in self.block_chunks for block in chunk.module]

    def block_fqn(self, i: int) -> str:
        if self.arch.block_chunks == 1:
            return f"blocks.{i}"
        per = self.arch.depth // self.arch.block_chunks
        return f"block_chunks.{i // per}.module.{i % per}"

    def lvl_embedded_before(self, i: int) -> bool:
        """Whether the scale embedding is added to the tokens right before block ``i`` (a chunk's first block)."""
        per = self.arch.depth // self.arch.block_chunks
        return i == 0 or (not self.arch.lvl_embed_first_chunk_only and i % per == 0)

    def set_schedule(self, schedule: ScaleSchedule | Sequence[tuple[int, int]]) -> None:
        """Fix the scale schedule (resolution and aspect ratio) of the following passes; no parameter changes."""
        if not isinstance(schedule, ScaleSchedule):
            schedule = custom_schedule(tuple(schedule))
        if schedule.num_scales > self.arch.num_lvl:
            raise ValueError(f"{schedule.num_scales} scales exceed the {self.arch.num_lvl} scale embeddings")
        self.schedule = schedule
        self.patch_nums = schedule.hw
        self.L = schedule.total_len
        self.begin_ends = list(schedule.begin_ends)
        device = self.pos_start.device
        scale_L = schedule.scale_of_token().to(device)
        # not in the state dict: they follow from the schedule (the official loader drops such buffers too)
        self.register_buffer("lvl_1L", scale_L.view(1, -1), persistent=False)
        visible_LL = scale_L.view(-1, 1) >= scale_L.view(1, -1)
        mask = torch.where(visible_LL, 0.0, -torch.inf).view(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask, persistent=False)
        self.register_buffer("rope_2Lh", rope_table(schedule, self.C // self.num_heads).to(device), persistent=False)

    # ------------------------------------------------------------------ pieces shared by both passes
    def set_kv_caching(self, enable: bool, capacity: int | None = None) -> None:
        for block in self.block_list():
            block.sa.kv_caching(enable, capacity)

    def uncond(self, text: TextCond) -> TextCond:
        """The unconditional text of the same lengths: the learned ``cfg_uncond`` rows replace the T5 features."""
        B, Lt, _ = text.features_BLtC.shape
        if Lt > self.cfg_uncond.shape[0]:
            raise ValueError(f"text of {Lt} tokens exceeds the model's {self.cfg_uncond.shape[0]} (text_maxlen)")
        feats = self.cfg_uncond[:Lt].to(text.features_BLtC.dtype).unsqueeze(0).expand(B, -1, -1)
        return TextCond(feats, text.lens_B)

    def cfg_pair(self, text: TextCond) -> TextCond:
        """[cond; uncond] (2B rows), the batch of classifier-free guidance."""
        return TextCond.cat((text, self.uncond(text)))

    def encode_text(self, text: TextCond) -> TextContext:
        if text.features_BLtC.shape[-1] != self.arch.text_channels:
            raise ValueError(
                f"text features have {text.features_BLtC.shape[-1]} channels; the model expects "
                f"{self.arch.text_channels} (check the text encoder against the model config)"
            )
        # T5 features usually arrive in fp16; the text projections run in the model's own dtype
        feats = text.features_BLtC.to(device=self.pos_start.device, dtype=self.cfg_uncond.dtype)
        mask = text_key_mask(text.lens_B.to(feats.device), feats.shape[1])
        normed = self.text_norm(feats)
        cond_BD = self.text_proj_for_sos(normed, mask)
        return TextContext(cond_BD, self.text_proj_for_ca(normed), mask)

    def modulations(self, cond_BD: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """AdaLN vectors of every block (B, 1, 6, C) and of the head (B, 1, 2, C); the same at every scale."""
        shared = self.shared_ada_lin(cond_BD).view(-1, 1, len(BLOCK_ADALN_CHUNKS), self.C)
        return [block.modulation(shared) for block in self.block_list()], self.head_nm.modulation(cond_BD.float())

    def run_blocks(
        self, x_BLC: torch.Tensor, ctx: TextContext, lvl_BLC: torch.Tensor, attn_bias: torch.Tensor | None,
        rope_2Lh: torch.Tensor, mods: Sequence[torch.Tensor] | None = None, ca_kvs: Sequence | None = None,
    ) -> torch.Tensor:
        if mods is None:
            mods, _ = self.modulations(ctx.cond_BD)
        for i, block in enumerate(self.block_list()):
            if self.lvl_embedded_before(i):
                x_BLC = x_BLC + lvl_BLC
            x_BLC = block(
                x_BLC, mods[i], ctx.ca_BLtD, ctx.key_mask_B11Lt, attn_bias, rope_2Lh,
                None if ca_kvs is None else ca_kvs[i],
            )
        return x_BLC

    def get_logits(
        self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, head_mod_B12C: torch.Tensor | None = None
    ) -> torch.Tensor:
        # head_nm and head in fp32 as in the official model, so logits do not depend on the block dtype
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float(), head_mod_B12C).float()).float()

    def sos(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return cond_BD.unsqueeze(1) + self.pos_start.expand(cond_BD.shape[0], -1, -1)

    # ------------------------------------------------------------------ teacher forcing
    def forward(
        self, text: TextCond, x_BLCv_wo_first_l: torch.Tensor, num_cond: int | None = None, masked: bool = True,
    ) -> torch.Tensor:
        """Teacher-forced pass: text, x (B, L−1, d) (each scale's input from the tokenizer) → logits (B, L, 2d) fp32.

        ``num_cond``: the number of conditional rows when the batch is a CFG pair. ``masked=False`` drops the
        block-causal mask. Text dropout (for CFG training) only happens in train mode.
        """
        B = x_BLCv_wo_first_l.shape[0]
        if x_BLCv_wo_first_l.shape[1] != self.L - self.first_l:
            raise ValueError(
                f"teacher-forcing input has {x_BLCv_wo_first_l.shape[1]} tokens; the schedule {self.patch_nums} "
                f"needs {self.L - self.first_l}"
            )
        if self.training and self.cond_drop_rate > 0:
            drop_B = torch.rand(B) < self.cond_drop_rate
            unc = self.uncond(text)
            feats = torch.where(drop_B.view(-1, 1, 1).to(text.features_BLtC.device), unc.features_BLtC, text.features_BLtC)
            text = TextCond(feats, text.lens_B)
        ctx = self.encode_text(text)
        x_BLC = torch.cat((self.sos(ctx.cond_BD), self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        lvl_BLC = self.lvl_embed(self.lvl_1L)
        dtype = torch.get_autocast_dtype(x_BLC.device.type) if torch.is_autocast_enabled(x_BLC.device.type) else x_BLC.dtype
        attn_bias = self.attn_bias_for_masking.to(dtype) if masked else None
        with self.token_ctx.scope(self.lvl_1L[0], num_cond):
            h_BLC = self.run_blocks(x_BLC, ctx, lvl_BLC, attn_bias, self.rope_2Lh)
            return self.get_logits(h_BLC, ctx.cond_BD)


def build_infinity(
    name_or_arch: str | InfinityArch, schedule: ScaleSchedule | None = None, seed: int = 0, **overrides
) -> Infinity:
    """An Infinity of a named size (``INFINITY_ARCHS``) or architecture; deterministic, no global RNG touched.

    Build on the meta device (``with torch.device("meta"):``) to inspect the 2B/8B layouts without memory.
    """
    if isinstance(name_or_arch, str):
        if name_or_arch not in INFINITY_ARCHS:
            raise KeyError(f"unknown Infinity size {name_or_arch!r}; choose one of {', '.join(INFINITY_ARCHS)}")
        arch = INFINITY_ARCHS[name_or_arch]
    else:
        arch = name_or_arch
    arch = replace(arch, **overrides) if overrides else arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Infinity(arch, schedule)
    return model.eval()
