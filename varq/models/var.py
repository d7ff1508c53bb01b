"""VAR: next-scale prediction transformer, one class for every size (d16 … d30, the digits model, tiny tests).

The VQ-VAE is not a submodule (as in the official code, so the state-dict keys match ``var_d*.pth``); the
sampler in ``varq.sample`` receives both models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from varq.models.adapter import TokenContext
from varq.models.var_blocks import AdaLNBeforeHead, AdaLNSelfAttn

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class VAR(nn.Module):
    family = "var"  # its structure is declared in varq.models.var_adapter

    def __init__(
        self,
        *,
        vocab_size: int = 4096,
        Cvae: int = 32,
        num_classes: int = 1000,
        depth: int = 16,
        width: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = True,
        patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS,
    ):
        super().__init__()
        self.V, self.Cvae, self.num_classes = vocab_size, Cvae, num_classes
        self.depth, self.C, self.D, self.num_heads = depth, width, width, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.token_ctx = TokenContext()

        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(Cvae, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # the last row is the null (unconditional) class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, width))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), width)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, std=init_std)
        self.shared_ada_lin = nn.Identity()  # the 256-px checkpoints use per-block AdaLN (shared only for d36)

        drop_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, block 0 gets 0
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(width, width, num_heads, mlp_ratio, norm_eps, drop_rates[i], attn_l2_norm)
            for i in range(depth)
        )

        scale_of_token_L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", scale_of_token_L.view(1, self.L).contiguous())
        # block-causal over scales: a token sees its own scale and every coarser one
        visible_LL = scale_of_token_L.view(self.L, 1) >= scale_of_token_L.view(1, self.L)
        attn_bias = torch.where(visible_LL, 0.0, -torch.inf).view(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", attn_bias.contiguous())

        self.head_nm = AdaLNBeforeHead(width, width, norm_eps)
        self.head = nn.Linear(width, vocab_size)

    # ------------------------------------------------------------------ pieces shared by both passes
    def set_kv_caching(self, enable: bool, capacity: int | None = None) -> None:
        """KV cache on/off in every block; ``capacity`` (tokens) preallocates it (inference only)."""
        for block in self.blocks:
            block.attn.kv_caching(enable, capacity)

    def lvl_pos_1LC(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def get_logits(
        self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, head_mod_B12C: torch.Tensor | None = None
    ) -> torch.Tensor:
        # head_nm and head in fp32, as in the official model, so logits do not depend on the block dtype
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float(), head_mod_B12C).float()).float()

    def run_blocks(
        self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None,
        mods: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Every block in order; ``mods`` (from `modulations`) skips recomputing each block's ``ada_lin(cond)``."""
        cond = self.shared_ada_lin(cond_BD)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond, attn_bias, None if mods is None else mods[i])
        return x_BLC

    def modulations(self, cond_BD: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """AdaLN parameters of every block and of the head for a condition (the same at every scale)."""
        cond = self.shared_ada_lin(cond_BD)
        return [block.modulation(cond) for block in self.blocks], self.head_nm.modulation(cond_BD.float())

    # ------------------------------------------------------------------ teacher forcing
    def forward(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, num_cond: int | None = None,
        masked: bool = True,
    ) -> torch.Tensor:
        """Teacher-forced pass over all scales: label_B (B,), x (B, L−first_l, Cvae) → logits (B, L, V) fp32.

        ``num_cond``: when the batch is a CFG pair [cond; uncond], the number of conditional rows (quantizers that
        treat the halves differently read it from ``token_ctx``). ``masked=False`` drops the block-causal mask
        (every token attends to every other; PTQ4ARVG's released calibration). Label dropout (for CFG training)
        only happens in train mode; the official model also drops labels in eval mode, which makes its
        teacher-forced logits random.
        """
        B = x_BLCv_wo_first_l.shape[0]
        if self.training and self.cond_drop_rate > 0:
            drop_B = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop_B, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x_BLC = x_BLC + self.lvl_pos_1LC()
        # the mask dtype follows autocast so SDPA sees one dtype
        dtype = torch.get_autocast_dtype(x_BLC.device.type) if torch.is_autocast_enabled(x_BLC.device.type) else x_BLC.dtype
        attn_bias = self.attn_bias_for_masking.to(dtype) if masked else None
        with self.token_ctx.scope(self.lvl_1L[0], num_cond):
            h_BLC = self.run_blocks(x_BLC.to(dtype), cond_BD.to(dtype), attn_bias)
            return self.get_logits(h_BLC, cond_BD)
