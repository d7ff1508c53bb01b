"""Under autocast, VAR's blocks and VQ-VAE keep the official code's dtype flow, so a bf16/fp16 run samples what the
official sampler samples; in fp32 they keep varq's stored arithmetic.

References are written here from the official formulas (``F.linear`` with the concatenated bias, the in-place
``.mul_(gamma1)`` of the attention branch, ``nin_shortcut(x) + h``), not taken from varq's modules. Each autocast
test also checks that the arithmetic varq used before differs on the same input, so the test can tell them apart.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from varq.models.vae_blocks import ResnetBlock
from varq.models.var_blocks import AdaLNSelfAttn, SelfAttention, linear_with_bias
from varq.quant.qmodules import QuantLinear

WIDTH, HEADS = 64, 4


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _attention(seed: int = 0) -> SelfAttention:
    torch.manual_seed(seed)
    attn = SelfAttention(WIDTH, HEADS, attn_l2_norm=True).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return attn


def _official_attention(attn: SelfAttention, x_BLC: torch.Tensor) -> torch.Tensor:
    """The official SelfAttention.forward without cache or mask (SDPA path), from its formulas."""
    B, L, C = x_BLC.shape
    bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
    qkv = F.linear(input=x_BLC, weight=attn.mat_qkv.weight, bias=bias).view(B, L, 3, HEADS, C // HEADS)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)
    scale_mul = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
    q = F.normalize(q, dim=-1).mul(scale_mul)
    k = F.normalize(k, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2).reshape(B, L, C)
    return attn.proj(out)


def test_attention_under_autocast_is_the_official_computation() -> None:
    attn = _attention()
    x_BLC = torch.randn(2, 9, WIDTH)
    with torch.no_grad(), _bf16():
        got = attn(x_BLC, attn_bias=None)
        expected = _official_attention(attn, x_BLC)
        # varq's former arithmetic: the fp32 bias added to the bf16 GEMM output promotes Q/K/V to fp32
        bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
        qkv_old = attn.mat_qkv(x_BLC) + bias
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert qkv_old.dtype == torch.float32  # what made the outputs differ


def test_fp32_attention_adds_the_bias_after_the_gemm() -> None:
    # stored varq results were computed with mm + add; the fp32 path must keep that arithmetic bit for bit
    attn = _attention(1)
    x_BLC = torch.randn(2, 9, WIDTH)
    bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
    with torch.no_grad():
        got = linear_with_bias(attn.mat_qkv, x_BLC, bias)
        assert torch.equal(got, x_BLC @ attn.mat_qkv.weight.t() + bias)


def test_a_swapped_linear_still_intercepts_under_autocast() -> None:
    attn = _attention(2)
    attn.mat_qkv = QuantLinear(attn.mat_qkv)
    x_BLC = torch.randn(1, 4, WIDTH)
    with torch.no_grad(), _bf16():
        attn(x_BLC, attn_bias=None)
    assert attn.mat_qkv.calls == 1


def test_attention_branch_is_rounded_like_the_official_in_place_scale() -> None:
    torch.manual_seed(3)
    block = AdaLNSelfAttn(WIDTH, WIDTH, HEADS, 4.0, 1e-6, 0.0, True).eval()
    x_BLC = torch.randn(2, 5, WIDTH)
    out_BLC = torch.randn(2, 5, WIDTH).bfloat16()  # a projection's autocast output
    mod_B16C = torch.randn(2, 1, 6, WIDTH)
    gamma1, gamma2 = mod_B16C[:, :, 0], mod_B16C[:, :, 1]
    with torch.no_grad():
        got_attn = block.add_branch("attn", x_BLC, out_BLC, mod_B16C)
        got_ffn = block.add_branch("ffn", x_BLC, out_BLC, mod_B16C)
    assert torch.equal(got_attn, x_BLC + out_BLC.clone().mul_(gamma1))  # official: attn(...).mul_(gamma1)
    assert torch.equal(got_ffn, x_BLC + out_BLC.mul(gamma2))  # official: ffn(...).mul(gamma2)
    assert not torch.equal(got_attn, x_BLC + out_BLC * gamma1)  # the unrounded product is another number
    # the caller's tensor is not written
    assert out_BLC.dtype == torch.bfloat16


@pytest.mark.parametrize("channels", [(32, 32), (32, 64)])
def test_resnet_block_under_autocast_sums_in_the_official_dtype(channels) -> None:
    torch.manual_seed(4)
    block = ResnetBlock(*channels).eval()
    x = torch.randn(2, channels[0], 6, 6)
    with torch.no_grad(), _bf16():
        h = block.conv1(F.silu(block.norm1(x)))
        h = block.conv2(F.silu(block.norm2(h)))
        expected = block.nin_shortcut(x) + h  # official: self.nin_shortcut(x) + h
        got = block(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    if channels[0] == channels[1]:
        assert got.dtype == torch.float32  # identity shortcut of an fp32 input: an fp32 sum, not conv2's bf16
