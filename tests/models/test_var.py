"""VAR transformer: checkpoint layout, numerics against independent references, KV cache vs teacher forcing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from varq.models.build import build_var, build_vqvae
from varq.models.factory import strong_random_init_

PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}
TINY_PN = (1, 2, 3, 4)


def documented_var_table(depth: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key → (shape, dtype) of var_d{depth}.pth, written from the documented layout (not from our model)."""
    C, H, L = 64 * depth, depth, 680
    f32 = torch.float32
    table = {
        "pos_start": ((1, 1, C), f32), "pos_1LC": ((1, L, C), f32), "lvl_1L": ((1, L), torch.int64),
        "attn_bias_for_masking": ((1, 1, L, L), f32), "word_embed.weight": ((C, 32), f32),
        "word_embed.bias": ((C,), f32), "class_emb.weight": ((1001, C), f32), "lvl_embed.weight": ((10, C), f32),
        "head_nm.ada_lin.1.weight": ((2 * C, C), f32), "head_nm.ada_lin.1.bias": ((2 * C,), f32),
        "head.weight": ((4096, C), f32), "head.bias": ((4096,), f32),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update({
            b + "attn.scale_mul_1H11": ((1, H, 1, 1), f32), b + "attn.q_bias": ((C,), f32),
            b + "attn.v_bias": ((C,), f32), b + "attn.zero_k_bias": ((C,), f32),
            b + "attn.mat_qkv.weight": ((3 * C, C), f32), b + "attn.proj.weight": ((C, C), f32),
            b + "attn.proj.bias": ((C,), f32), b + "ffn.fc1.weight": ((4 * C, C), f32),
            b + "ffn.fc1.bias": ((4 * C,), f32), b + "ffn.fc2.weight": ((C, 4 * C), f32),
            b + "ffn.fc2.bias": ((C,), f32), b + "ada_lin.1.weight": ((6 * C, C), f32),
            b + "ada_lin.1.bias": ((6 * C,), f32),
        })
    return table


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_official_layout_and_strict_load(depth):
    with torch.device("meta"):
        var = build_var(depth)
    assert sum(p.numel() for p in var.parameters()) == PARAMS[depth]
    table = documented_var_table(depth)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in var.state_dict().items()}
    assert ours == table
    # strict load of a checkpoint-shaped dict (meta tensors: the check is keys and shapes, not values)
    fake_ckpt = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in table.items()}
    var.load_state_dict(fake_ckpt, strict=True, assign=True)


def tiny_pair(depth: int = 2, width: int = 128, heads: int = 2, V: int = 64, Cvae: int = 8, seed: int = 0):
    var = strong_random_init_(build_var(depth, vocab_size=V, Cvae=Cvae, num_classes=10, width=width,
                                        num_heads=heads, patch_nums=TINY_PN), seed=seed)
    var.cond_drop_rate = 0.0
    vqvae = build_vqvae(vocab_size=V, z_channels=Cvae, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=TINY_PN)
    return var, vqvae


def test_buffers_scale_index_and_block_causal_mask():
    var, _ = tiny_pair()
    expected_lvl = [0] + [1] * 4 + [2] * 9 + [3] * 16
    assert var.lvl_1L[0].tolist() == expected_lvl
    bias = var.attn_bias_for_masking[0, 0]
    for q in range(var.L):
        for k in range(var.L):
            visible = expected_lvl[q] >= expected_lvl[k]
            assert (bias[q, k] == 0) if visible else torch.isneginf(bias[q, k])


def reference_attention(attn, x_BLC, mask_LL):
    """Cosine attention written from the formula: logits = (q̂·k̂)·exp(min(s, ln 100)), softmax scale 1."""
    B, L, C = x_BLC.shape
    H, c = attn.num_heads, attn.head_dim
    W = attn.mat_qkv.weight
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = x_BLC @ W.T + bias
    q, k, v = [t.reshape(B, L, H, c).permute(0, 2, 1, 3) for t in qkv.split(C, dim=-1)]
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    temp = torch.exp(torch.clamp(attn.scale_mul_1H11, max=math.log(100)))
    logits = (q @ k.transpose(-1, -2)) * temp + mask_LL
    out = logits.softmax(-1) @ v
    return out.permute(0, 2, 1, 3).reshape(B, L, C) @ attn.proj.weight.T + attn.proj.bias


def test_attention_matches_reference_including_temperature_clamp():
    var, _ = tiny_pair()
    attn = var.blocks[0].attn
    with torch.no_grad():
        attn.scale_mul_1H11[0, 0] = 6.0  # above ln 100 ≈ 4.6: must be clamped
    x = torch.randn(2, var.L, var.C, generator=torch.Generator().manual_seed(3))
    mask = var.attn_bias_for_masking[0, 0]
    with torch.no_grad():
        ours = attn(x, mask[None, None])
        ref = reference_attention(attn, x, mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_block_adaln_chunk_order():
    var, _ = tiny_pair()
    block = var.blocks[1]
    x = torch.randn(2, 5, var.C, generator=torch.Generator().manual_seed(4))
    cond = torch.randn(2, var.C, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        g1, g2, s1, s2, b1, b2 = (F.linear(F.silu(cond), block.ada_lin[1].weight, block.ada_lin[1].bias)
                                  .view(2, 1, 6, var.C).unbind(2))
        ln = lambda t: F.layer_norm(t, (var.C,), eps=1e-6)  # noqa: E731
        h = x + g1 * block.attn(ln(x) * (1 + s1) + b1, None)
        expected = h + g2 * block.ffn.fc2(F.gelu(block.ffn.fc1(ln(h) * (1 + s2) + b2), approximate="tanh"))
        torch.testing.assert_close(block(x, cond, None), expected, atol=1e-5, rtol=1e-5)


def test_kv_cached_loop_matches_teacher_forcing():
    from varq.sample.sampler import generate

    var, vqvae = tiny_pair()
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    gt_idx = vqvae.img_to_idxBl(img)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        tf_logits = var(labels, vqvae.idxBl_to_var_input(gt_idx))
    assert tf_logits.shape == (2, var.L, var.V) and tf_logits.std() > 0.5  # strong weights: logits not tiny
    seen = {}

    def keep_cond(si, logits_2BlV):
        seen[si] = logits_2BlV[:2].clone()

    generate(var, vqvae, labels, cfg=0.0, rng=torch.Generator().manual_seed(0), on_logits=keep_cond,
             override_idx=lambda si, idx: gt_idx[si])
    for si, (begin, end) in enumerate(var.begin_ends):
        torch.testing.assert_close(seen[si], tf_logits[:, begin:end], atol=1e-4, rtol=0)


def test_cfg_mix_formula():
    from varq.sample.sampler import cfg_mix

    cond, uncond = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for si in range(10):
        t = 1.5 * si / 9
        torch.testing.assert_close(cfg_mix(torch.cat([cond, uncond]), 1.5, si, 10), (1 + t) * cond - t * uncond)


def test_eval_mode_is_deterministic_and_training_drops_labels():
    var, vqvae = tiny_pair()
    var.cond_drop_rate = 0.5
    x = torch.randn(8, var.L - 1, var.Cvae)
    labels = torch.arange(8) % 10
    with torch.no_grad():
        torch.testing.assert_close(var(labels, x), var(labels, x))  # eval: no label dropout, no drop-path
        var.train()
        torch.manual_seed(0)
        differs = not torch.allclose(var(labels, x), var(labels, x))
    assert differs


def test_building_leaves_global_state_alone():
    patched = {cls: cls.reset_parameters for cls in (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Embedding)}
    rng_state = torch.get_rng_state()
    a, _ = tiny_pair()
    b = build_var(2, vocab_size=64, Cvae=8, num_classes=10, width=128, num_heads=2, patch_nums=TINY_PN)
    c = build_var(2, vocab_size=64, Cvae=8, num_classes=10, width=128, num_heads=2, patch_nums=TINY_PN)
    assert all(cls.reset_parameters is fn for cls, fn in patched.items())
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(p, q) for p, q in zip(b.state_dict().values(), c.state_dict().values()))
    assert not torch.isnan(nn.Linear(4, 4).weight).any()
    del a


def test_ffn_inference_gelu_in_place_equals_the_plain_composition():
    # Without autograd the FFN applies its GELU over fc1's fresh output; the values must be fc2(GELU(fc1(x))) bit
    # for bit, and with autograd the gradient must still flow through the module's own GELU.
    from varq.models.var_blocks import FFN

    torch.manual_seed(0)
    ffn = FFN(16, 64)
    x = torch.randn(2, 5, 16)
    expected = F.linear(F.gelu(F.linear(x, ffn.fc1.weight, ffn.fc1.bias), approximate="tanh"),
                        ffn.fc2.weight, ffn.fc2.bias)
    x_before = x.clone()
    with torch.no_grad():
        got = ffn(x)
    assert torch.equal(got, expected) and torch.equal(x, x_before)
    x.requires_grad_(True)
    ffn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
