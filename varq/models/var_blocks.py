"""Transformer blocks of VAR: cosine self-attention with a KV cache, the GELU MLP and the AdaLN wrappers.

Parameter and buffer names follow the official checkpoints exactly (``mat_qkv``, ``q_bias``, ``zero_k_bias``,
``scale_mul_1H11``, ``ada_lin.1`` …) so ``load_state_dict(strict=True)`` works both ways. Two deliberate
differences from the official code, neither of which changes what a checkpoint computes:

* ``mat_qkv`` is called as a module and its bias added to the output (``self.mat_qkv(x) + bias``) instead of
  ``F.linear`` on its weight, so a quantized-Linear swap really intercepts the projection; only a plain Linear
  under autocast runs the official fused call, whose output dtype the rest of the block depends on
  (`linear_with_bias`);
* the attention matmuls can be routed through a pluggable ``operand_quant`` module, which receives Q, K, V
  (K and V including the KV cache) so that every operand can be fake-quantized; with ``None`` the fast fused
  ``scaled_dot_product_attention`` path runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_with_bias(linear: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``linear(x) + bias`` for a Linear without a bias of its own (``mat_qkv``, whose bias lives in other tensors).

    Under autocast a plain ``nn.Linear`` runs as the official code writes it, ``F.linear`` with the bias: the output
    stays bf16/fp16 (the bias is cast too), so Q, K and V are normalised in that dtype as in the official block.
    Adding the fp32 bias to a bf16 GEMM output instead promotes everything after it to fp32: on d16 that moved the
    logits by up to 0.03 at the first scale and sampled other tokens from the fifth on. In fp32 the bias is added
    after the GEMM, the arithmetic every stored varq result was computed with (the official ``addmm`` adds it inside
    the GEMM: logits differ by at most 4.2e-6 at d16, and the sampled images were identical). Any other module (a
    fake-quantized or fp8 Linear swapped in by varq.quant) is called as a module, so it intercepts the projection.
    """
    if type(linear) is nn.Linear and torch.is_autocast_enabled(x.device.type):
        return F.linear(x, linear.weight, bias)
    return linear(x) + bias


class DropPath(nn.Module):
    """Stochastic depth per sample; the identity outside training (varq never samples in train mode)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x_BLC
        keep = 1.0 - self.drop_prob
        mask_B11 = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(keep)
        return x_BLC * mask_B11 / keep


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        h_BLD = self.fc1(x_BLC)
        if torch.is_grad_enabled():
            return self.fc2(self.act(h_BLD))
        # At inference the GELU overwrites fc1's fresh output, the same values without a second (B, L, 4C) tensor:
        # on a CPU every fresh tensor of that size (32 MiB at d16's last scale, batch 4 with CFG) is a new mapping
        # that page-faults on first touch, which cost about as much as the GELU itself.
        return self.fc2(torch._C._nn.gelu_(h_BLD, approximate=self.act.approximate))


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k and a learned per-head temperature (VAR's ``attn_l2_norm``)."""

    def __init__(self, width: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        assert width % num_heads == 0, f"width {width} is not divisible by num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # cosine logits times exp(scale_mul) ≤ 100, softmax scale 1
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # persistent: the checkpoints contain it
        self.proj = nn.Linear(width, width)
        # Set by varq.quant to fake-quantize Q, K, softmax output and V; None = FP fused attention.
        self.operand_quant: nn.Module | None = None
        self.caching = False
        self.cached_k_BHLc: torch.Tensor | None = None
        self.cached_v_BHLc: torch.Tensor | None = None
        self.kv_capacity: int | None = None
        self._kv_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kv_len = 0

    def kv_caching(self, enable: bool, capacity: int | None = None) -> None:
        """Switch the KV cache on or off (either way it starts empty).

        ``capacity`` (tokens): keep K and V in buffers of that length, allocated at the first step and written by
        slices, instead of growing them with ``torch.cat`` (which copies the whole cache at every scale). The values
        are the same; only inference may use it (a later write would modify a tensor autograd saved).
        """
        if capacity is not None and capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1 token, got {capacity}")
        self.caching, self.cached_k_BHLc, self.cached_v_BHLc = enable, None, None
        self.kv_capacity = capacity if enable else None
        self._kv_buffers, self._kv_len = None, 0

    def _append_kv(self, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_capacity is None:
            if self.cached_k_BHLc is not None:
                k_BHLc = torch.cat((self.cached_k_BHLc, k_BHLc), dim=2)
                v_BHLc = torch.cat((self.cached_v_BHLc, v_BHLc), dim=2)
            return k_BHLc, v_BHLc
        if torch.is_grad_enabled() and (k_BHLc.requires_grad or v_BHLc.requires_grad):
            raise RuntimeError("a preallocated KV cache is for inference; enable it without capacity to train")
        B, H, L, c = k_BHLc.shape
        begin, end = self._kv_len, self._kv_len + L
        if end > self.kv_capacity:
            raise ValueError(f"KV cache holds {self.kv_capacity} tokens; {end} were written")
        if self._kv_buffers is None:
            shape = (B, H, self.kv_capacity, c)
            self._kv_buffers = (k_BHLc.new_empty(shape), v_BHLc.new_empty(shape))
        k_buf, v_buf = self._kv_buffers
        k_buf[:, :, begin:end] = k_BHLc
        v_buf[:, :, begin:end] = v_BHLc
        self._kv_len = end
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def qkv_heads(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V per head (B, H, L, c) of the input tokens; q/k L2-normalised and q scaled by the temperature."""
        B, L, C = x_BLC.shape
        bias_3C = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear_with_bias(self.mat_qkv, x_BLC, bias_3C).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            temperature_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(temperature_1H11)
            k_BHLc = F.normalize(k_BHLc, dim=-1)
        return q_BHLc, k_BHLc, v_BHLc

    def attend(
        self, q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, attn_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of the queries over the cached and new keys, then the output projection: (B, L, C)."""
        B, _, L, _ = q_BHLc.shape
        if self.caching:
            # Scale-by-scale inference: the new tokens attend to every cached (coarser) scale and to themselves,
            # which is exactly the block-causal mask of teacher forcing.
            k_BHLc, v_BHLc = self._append_kv(k_BHLc, v_BHLc)
            self.cached_k_BHLc, self.cached_v_BHLc = k_BHLc, v_BHLc
        if self.operand_quant is None:
            mask = None if attn_bias is None else attn_bias.to(q_BHLc.dtype)
            out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=mask, scale=self.scale)
        else:
            out_BHLc = self.operand_quant(q_BHLc, k_BHLc, v_BHLc, attn_bias, self.scale)
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        return self.attend(*self.qkv_heads(x_BLC), attn_bias)


# The order of the six AdaLN chunks in a block's ``ada_lin`` output (the official checkpoints' layout) and the two
# of the head's; the forward passes below and varq.models.var_adapter both read them from here.
BLOCK_ADALN_CHUNKS = ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
HEAD_ADALN_CHUNKS = ("scale", "shift")
_CHUNK = {name: i for i, name in enumerate(BLOCK_ADALN_CHUNKS)}


class AdaLNSelfAttn(nn.Module):
    """One VAR block: x += γ1·Attn(LN(x)(1+s1)+b1); x += γ2·FFN(LN(x)(1+s2)+b2), modulation from the class."""

    def __init__(
        self, width: int, cond_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
        drop_path: float, attn_l2_norm: bool,
    ):
        super().__init__()
        self.C = width
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(width, num_heads, attn_l2_norm)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, len(BLOCK_ADALN_CHUNKS) * width))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The AdaLN parameters (B, 1, 6, C) of a condition; constant across scales, so a sampler may reuse it."""
        return self.ada_lin(cond_BD).view(-1, 1, len(BLOCK_ADALN_CHUNKS), self.C)

    def branch_input(self, branch: str, x_BLC: torch.Tensor, mod_B16C: torch.Tensor) -> torch.Tensor:
        """LN(x)·(1 + scale) + shift, the input of the ``"attn"`` or ``"ffn"`` branch under modulation ``mod``."""
        chunks = mod_B16C.unbind(2)
        i = 1 if branch == "attn" else 2
        scale, shift = chunks[_CHUNK[f"scale{i}"]], chunks[_CHUNK[f"shift{i}"]]
        # `.add_` on a fresh product: same values as `+`, one full-size temporary fewer
        return (self.ln_wo_grad(x_BLC) * (1 + scale)).add_(shift)

    def add_branch(self, branch: str, x_BLC: torch.Tensor, out_BLC: torch.Tensor, mod_B16C: torch.Tensor) -> torch.Tensor:
        """The residual update x + γ·branch(…) of the ``"attn"`` or ``"ffn"`` branch."""
        gamma = mod_B16C.unbind(2)[_CHUNK["gamma1" if branch == "attn" else "gamma2"]]
        scaled_BLC = out_BLC * gamma
        if branch == "attn":
            # The official block scales the attention output in place (`.mul_(gamma1)`), so under autocast the
            # product is rounded to the projection's bf16/fp16 before the fp32 residual sum (the FFN's `.mul` is
            # not). Casting the fresh product gives those values without writing into the caller's tensor; in fp32
            # it is a no-op.
            scaled_BLC = scaled_BLC.to(out_BLC.dtype)
        return x_BLC + self.drop_path(scaled_BLC)

    def forward(
        self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None,
        mod_B16C: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mod_B16C is None:
            mod_B16C = self.modulation(cond_BD)
        x_BLC = self.add_branch("attn", x_BLC, self.attn(self.branch_input("attn", x_BLC, mod_B16C), attn_bias), mod_B16C)
        return self.add_branch("ffn", x_BLC, self.ffn(self.branch_input("ffn", x_BLC, mod_B16C)), mod_B16C)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, len(HEAD_ADALN_CHUNKS) * width))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(scale, shift) stacked as (B, 1, 2, C); constant across scales."""
        return self.ada_lin(cond_BD).view(-1, 1, len(HEAD_ADALN_CHUNKS), self.C)

    def modulated(self, x_BLC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = mod_B12C.unbind(2)  # HEAD_ADALN_CHUNKS
        return (self.ln_wo_grad(x_BLC) * (1 + scale)).add_(shift)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, mod_B12C: torch.Tensor | None = None) -> torch.Tensor:
        return self.modulated(x_BLC, self.modulation(cond_BD) if mod_B12C is None else mod_B12C)
