"""Infinity's transformer pieces: rotary self-attention, text cross-attention, the attention pool, the block.

Parameter and buffer names follow the official checkpoints (``sa.mat_qkv``, ``ca.mat_q``, ``ca.mat_kv``,
``ca_norm``, ``ada_gss`` …). Deliberate differences from the official code, none of which changes what a
checkpoint computes:

* ``mat_qkv`` and ``mat_kv`` are called as modules (plus their bias vectors) instead of through ``F.linear`` on
  their weights, so a quantized-Linear swap intercepts them; only plain Linears under autocast run the official
  fused call, for its output dtype (`linear_with_bias`);
* cross-attention runs over padded text with a key mask instead of a packed variable-length kernel, in the
  block's dtype (the official code casts fp32 cross-attention to bf16 for the flash kernel);
* self-attention receives the rotary angles of exactly its query tokens, so a KV-cached step at scale k rotates
  by scale k's positions (the official non-fused path gives every cached step the positions of scale 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from varq.models.infinity_scales import apply_rope
from varq.models.var_blocks import BLOCK_ADALN_CHUNKS, FFN, SelfAttention, linear_with_bias

__all__ = ["RotarySelfAttention", "CrossAttention", "TextAttentivePool", "CrossAttnBlock", "RMSNorm", "text_key_mask"]

_CHUNK = {name: i for i, name in enumerate(BLOCK_ADALN_CHUNKS)}


def text_key_mask(lens_B: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, 1, 1, Lt) bool: True where a text key is a real token (its index < the row's length)."""
    return (torch.arange(max_len, device=lens_B.device).view(1, -1) < lens_B.view(-1, 1)).view(-1, 1, 1, max_len)


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain, computed in fp32 (``text_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight).to(x.dtype)


class RotarySelfAttention(SelfAttention):
    """VAR's cosine self-attention (KV cache, ``operand_quant`` slot) with 2-D rotary positions on q and k."""

    def forward(
        self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None, rope_2Lh: torch.Tensor | None = None
    ) -> torch.Tensor:
        q_BHLc, k_BHLc, v_BHLc = self.qkv_heads(x_BLC)  # cosine attention: q/k normalised, q × temperature
        if rope_2Lh is not None:
            q_BHLc = apply_rope(q_BHLc, rope_2Lh).to(v_BHLc.dtype)
            k_BHLc = apply_rope(k_BHLc, rope_2Lh).to(v_BHLc.dtype)
        return self.attend(q_BHLc, k_BHLc, v_BHLc, attn_bias)


class CrossAttention(nn.Module):
    """Softmax attention from image tokens (``mat_q``) to text tokens (``mat_kv``), scale 1/√head_dim, no cosine.

    With ``pool_queries`` the queries are a learned (1, H, c) parameter instead of a projection (the text pool).
    """

    def __init__(self, width: int, kv_dim: int, num_heads: int, pool_queries: bool = False):
        super().__init__()
        assert width % num_heads == 0, f"width {width} is not divisible by num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        if pool_queries:
            q = torch.empty(1, num_heads, self.head_dim)
            nn.init.trunc_normal_(q, std=math.sqrt(1 / width / 3))
            self.mat_q = nn.Parameter(q)
        else:
            self.mat_q = nn.Linear(width, width, bias=True)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def kv(self, text_BLtD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B, H, Lt, c) of the text; the same at every scale, so a sampler may compute them once."""
        B, Lt, _ = text_BLtD.shape
        kv = linear_with_bias(self.mat_kv, text_BLtD, torch.cat((self.zero_k_bias, self.v_bias))).view(
            B, Lt, 2, self.num_heads, self.head_dim
        )
        k_BHLc, v_BHLc = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k_BHLc, v_BHLc

    def forward(
        self, x_BLC: torch.Tensor | None, text_BLtD: torch.Tensor, key_mask_B11Lt: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        k_BHLc, v_BHLc = self.kv(text_BLtD) if kv is None else kv
        B = k_BHLc.shape[0]
        if isinstance(self.mat_q, nn.Parameter):
            q_BHLc = self.mat_q.to(v_BHLc.dtype).unsqueeze(2).expand(B, -1, -1, -1)  # one query per row
        else:
            L = x_BLC.shape[1]
            q_BHLc = self.mat_q(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=key_mask_B11Lt, scale=self.scale)
        B, H, L, c = out_BHLc.shape
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, H * c))


class TextAttentivePool(nn.Module):
    """The pooled text vector: attention of learned queries over the normalised text tokens (start token, AdaLN)."""

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        head_dim = 64 if width > 4096 else 128
        self.ca = CrossAttention(width, text_dim, num_heads=text_dim // head_dim, pool_queries=True)

    def forward(self, text_BLtCt: torch.Tensor, key_mask_B11Lt: torch.Tensor) -> torch.Tensor:
        return self.ca(None, text_BLtCt, key_mask_B11Lt).squeeze(1)


class CrossAttnBlock(nn.Module):
    """x += γ1·SA(LN(x)(1+s1)+b1); x += CA(ca_norm(x), text); x += γ2·FFN(LN(x)(1+s2)+b2).

    The six modulation vectors are the block's ``ada_gss`` plus the shared AdaLN output of the pooled text.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.C = width
        self.sa = RotarySelfAttention(width, num_heads, attn_l2_norm=True)
        self.ca = CrossAttention(width, width, num_heads)
        self.ffn = FFN(width, round(width * mlp_ratio / 256) * 256)
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=True)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, len(BLOCK_ADALN_CHUNKS), width) / width**0.5)

    def modulation(self, shared_B16C: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C): this block's gamma/scale/shift vectors for a shared AdaLN output."""
        return self.ada_gss + shared_B16C

    def branch_input(self, branch: str, x_BLC: torch.Tensor, mod_B16C: torch.Tensor) -> torch.Tensor:
        """LN(x)·(1 + scale) + shift for ``"attn"`` / ``"ffn"``; ca_norm(x) for ``"cross"``."""
        if branch == "cross":
            return self.ca_norm(x_BLC)
        chunks = mod_B16C.unbind(2)
        i = 1 if branch == "attn" else 2
        scale, shift = chunks[_CHUNK[f"scale{i}"]], chunks[_CHUNK[f"shift{i}"]]
        return (self.ln_wo_grad(x_BLC) * (1 + scale)).add_(shift)

    def add_branch(self, branch: str, x_BLC: torch.Tensor, out_BLC: torch.Tensor, mod_B16C: torch.Tensor) -> torch.Tensor:
        if branch == "cross":
            return x_BLC + out_BLC.to(x_BLC.dtype)
        gamma = mod_B16C.unbind(2)[_CHUNK["gamma1" if branch == "attn" else "gamma2"]]
        return x_BLC + out_BLC * gamma

    def forward(
        self, x_BLC: torch.Tensor, mod_B16C: torch.Tensor, text_BLtD: torch.Tensor, key_mask_B11Lt: torch.Tensor,
        attn_bias: torch.Tensor | None, rope_2Lh: torch.Tensor | None, ca_kv: tuple | None = None,
    ) -> torch.Tensor:
        sa_in = self.branch_input("attn", x_BLC, mod_B16C).to(x_BLC.dtype)
        x_BLC = self.add_branch("attn", x_BLC, self.sa(sa_in, attn_bias, rope_2Lh), mod_B16C)
        ca_out = self.ca(self.branch_input("cross", x_BLC, mod_B16C), text_BLtD, key_mask_B11Lt, ca_kv)
        x_BLC = self.add_branch("cross", x_BLC, ca_out, mod_B16C)
        ffn_in = self.branch_input("ffn", x_BLC, mod_B16C).to(x_BLC.dtype)
        return self.add_branch("ffn", x_BLC, self.ffn(ffn_in), mod_B16C)
