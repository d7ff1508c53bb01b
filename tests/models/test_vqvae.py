"""Multi-scale VQ-VAE: checkpoint layout and quantizer semantics against references written from the spec.

The references below are plain loops over scales and positions (var.md §2); they never call back into the code
under test except to read its parameters. Small configurations keep the suite fast on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varq.models.msvq import MultiScaleVectorQuantizer, Phi, phi_index_table
from varq.models.vae_blocks import AttnBlock
from varq.models.vqvae import build_vqvae

SMALL = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 3, 4, 6, 8))
SMALL_IMG_SIDE = 16  # one downsample: 16² image → 8² latent
# ticks linspace(1/12, 11/12, 4) = (.083, .361, .639, .917) vs si/5 = (0, .2, .4, .6, .8, 1): no near-ties.
SMALL_PHI_IDX = (0, 0, 1, 2, 3, 3)
OFFICIAL_PARAMS = 108_948_355


# ------------------------------------------------------------------------------------------ references
def _official_key_shapes() -> dict[str, tuple[int, ...]]:
    """The checkpoint's 324 keys and shapes, generated from the layout in var.md §2.2-2.3."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(p: str, c_in: int, c_out: int, k: int) -> None:
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(p: str, c: int) -> None:
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c,), (c,)

    def res(p: str, c_in: int, c_out: int) -> None:
        norm(f"{p}.norm1", c_in), conv(f"{p}.conv1", c_in, c_out, 3)
        norm(f"{p}.norm2", c_out), conv(f"{p}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{p}.nin_shortcut", c_in, c_out, 1)

    def attn(p: str, c: int) -> None:
        norm(f"{p}.norm", c), conv(f"{p}.qkv", c, 3 * c, 1), conv(f"{p}.proj_out", c, c, 1)

    def mid(p: str, c: int) -> None:
        res(f"{p}.block_1", c, c), attn(f"{p}.attn_1", c), res(f"{p}.block_2", c, c)

    widths = [160, 160, 320, 320, 640]
    conv("encoder.conv_in", 3, 160, 3)
    c = 160
    for i, w in enumerate(widths):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", c, w)
            c = w
            if i == 4:
                attn(f"encoder.down.{i}.attn.{j}", w)
        if i != 4:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 3)
    mid("encoder.mid", 640), norm("encoder.norm_out", 640), conv("encoder.conv_out", 640, 32, 3)

    conv("decoder.conv_in", 32, 640, 3)
    mid("decoder.mid", 640)
    c = 640
    for i in reversed(range(5)):
        for j in range(3):
            res(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
            if i == 4:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", 160), conv("decoder.conv_out", 160, 3, 3)

    conv("quant_conv", 32, 32, 3), conv("post_quant_conv", 32, 32, 3)
    shapes["quantize.embedding.weight"] = (4096, 32)
    for k in range(4):
        conv(f"quantize.quant_resi.qresi_ls.{k}", 32, 32, 3)
    shapes["quantize.ema_vocab_hit_SV"] = (10, 4096)
    return shapes


def _ref_phi(q: MultiScaleVectorQuantizer, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
    conv = q.quant_resi.qresi_ls[SMALL_PHI_IDX[si]]
    return 0.5 * h_BChw + 0.5 * F.conv2d(h_BChw, conv.weight, conv.bias, padding=1)


def _ref_code_map(codes_VC: torch.Tensor, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
    B, C = idx_Bl.shape[0], codes_VC.shape[1]
    h_BChw = torch.empty(B, C, pn, pn)
    for b in range(B):
        for y in range(pn):
            for x in range(pn):
                h_BChw[b, :, y, x] = codes_VC[idx_Bl[b, y * pn + x]]
    return h_BChw


def _ref_up(h_BChw: torch.Tensor, si: int, side: int, num_scales: int) -> torch.Tensor:
    if si == num_scales - 1:
        return h_BChw
    return F.interpolate(h_BChw, size=(side, side), mode="bicubic", align_corners=False)


def _ref_encode(q: MultiScaleVectorQuantizer, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Residual quantization loop: area-down, nearest code (float64 distances), bicubic-up, φ, accumulate."""
    codes_VC = q.embedding.weight
    B, _, side, _ = f_BChw.shape
    S = len(q.patch_nums)
    rest_BChw, f_hat_BChw = f_BChw.clone(), torch.zeros_like(f_BChw)
    idx_list, fhat_list = [], []
    for si, pn in enumerate(q.patch_nums):
        z_BChw = F.adaptive_avg_pool2d(rest_BChw, pn) if si != S - 1 else rest_BChw  # 'area' == adaptive avg pool
        idx_Bl = torch.empty(B, pn * pn, dtype=torch.long)
        for b in range(B):
            for y in range(pn):
                for x in range(pn):
                    d_V = (codes_VC.double() - z_BChw[b, :, y, x].double()).square().sum(dim=1)
                    idx_Bl[b, y * pn + x] = int(torch.argmin(d_V))
        h_BChw = _ref_phi(q, _ref_up(_ref_code_map(codes_VC, idx_Bl, pn), si, side, S), si)
        f_hat_BChw, rest_BChw = f_hat_BChw + h_BChw, rest_BChw - h_BChw
        idx_list.append(idx_Bl)
        fhat_list.append(f_hat_BChw)
    return idx_list, fhat_list


def _ref_var_input(q: MultiScaleVectorQuantizer, idx_list: list[torch.Tensor]) -> torch.Tensor:
    codes_VC, pns = q.embedding.weight, q.patch_nums
    B, C, side, S = idx_list[0].shape[0], codes_VC.shape[1], pns[-1], len(pns)
    f_hat_BChw = torch.zeros(B, C, side, side)
    rows = []
    for si in range(S - 1):
        f_hat_BChw = f_hat_BChw + _ref_phi(q, _ref_up(_ref_code_map(codes_VC, idx_list[si], pns[si]), si, side, S), si)
        nxt_BChw = F.adaptive_avg_pool2d(f_hat_BChw, pns[si + 1])
        for y in range(pns[si + 1]):
            for x in range(pns[si + 1]):
                rows.append(nxt_BChw[:, :, y, x])
    return torch.stack(rows, dim=1)


# ------------------------------------------------------------------------------------------ fixtures
def _strong_quantizer(seed: int = 0) -> MultiScaleVectorQuantizer:
    torch.manual_seed(seed)
    q = MultiScaleVectorQuantizer(SMALL["vocab_size"], SMALL["z_channels"], SMALL["patch_nums"]).eval()
    with torch.no_grad():
        q.embedding.weight.normal_(0.0, 1.0)
        for conv in q.quant_resi.qresi_ls:
            conv.weight.normal_(0.0, (1 / conv.weight[0].numel()) ** 0.5)
            conv.bias.normal_(0.0, 0.5)
    return q


@pytest.fixture
def quantizer_and_f() -> tuple[MultiScaleVectorQuantizer, torch.Tensor]:
    q = _strong_quantizer()
    f_BChw = torch.randn(2, SMALL["z_channels"], 8, 8, generator=torch.Generator().manual_seed(1))
    return q, f_BChw


# ------------------------------------------------------------------------------------------ tests
def test_official_config_state_dict_layout() -> None:
    expected = _official_key_shapes()
    assert len(expected) == 324
    assert sum(math.prod(s) for k, s in expected.items() if k != "quantize.ema_vocab_hit_SV") == OFFICIAL_PARAMS

    with torch.device("meta"):  # shapes only: no 436 MB allocation
        vae = build_vqvae()
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected
    assert sum(p.numel() for p in vae.parameters()) == OFFICIAL_PARAMS
    counts = {n: sum(p.numel() for p in getattr(vae, n).parameters()) for n in ("encoder", "decoder", "quantize")}
    assert counts == {"encoder": 44_107_872, "decoder": 64_653_923, "quantize": 168_064}
    assert tuple(vae.quantize.ema_vocab_hit_SV.shape) == (10, 4096)
    assert not vae.training
    vae.load_state_dict({k: torch.zeros(s, device="meta") for k, s in expected.items()}, strict=True)


def test_load_state_dict_tolerates_other_usage_buffer_only() -> None:
    vae = build_vqvae(**SMALL)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(3, SMALL["vocab_size"])  # a checkpoint with 3 scales
    vae.load_state_dict(sd, strict=True)
    assert tuple(vae.quantize.ema_vocab_hit_SV.shape) == (len(SMALL["patch_nums"]), SMALL["vocab_size"])
    sd["quant_conv.bias"] = torch.zeros(3)
    with pytest.raises(RuntimeError):
        vae.load_state_dict(sd, strict=True)


def test_phi_index_table_and_formula() -> None:
    assert phi_index_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # si = 2 is a float64 tie-break (P5)
    assert phi_index_table(6, 4) == SMALL_PHI_IDX
    ticks = [1 / 12 + k * (10 / 12) / 3 for k in range(4)]
    assert SMALL_PHI_IDX == tuple(min(range(4), key=lambda k: abs(ticks[k] - si / 5)) for si in range(6))
    with torch.device("meta"):
        assert build_vqvae().quantize.quant_resi.phi_idx == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)

    q = _strong_quantizer()
    for si in range(len(SMALL["patch_nums"])):
        assert q.quant_resi[si] is q.quant_resi.qresi_ls[SMALL_PHI_IDX[si]]
    phi = q.quant_resi.qresi_ls[1]
    assert isinstance(phi, Phi) and not isinstance(phi, nn.Conv2d)
    g = torch.Generator().manual_seed(2)
    for side in (3, 8):
        h_BChw = torch.randn(2, SMALL["z_channels"], side, side, generator=g)
        ref = 0.5 * h_BChw + 0.5 * F.conv2d(h_BChw, phi.weight, phi.bias, padding=1)
        torch.testing.assert_close(phi(h_BChw), ref, atol=1e-6, rtol=0)


def test_f_to_idxBl_matches_reference(quantizer_and_f) -> None:
    q, f_BChw = quantizer_and_f
    ref_idx, ref_fhat = _ref_encode(q, f_BChw)
    idx = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=False)
    assert [tuple(i.shape) for i in idx] == [(2, pn * pn) for pn in SMALL["patch_nums"]]
    assert all(i.dtype == torch.long for i in idx)
    for got, want in zip(idx, ref_idx):
        assert torch.equal(got, want)
    assert len({int(v) for i in idx for v in i.flatten()}) > 10  # the strong init really exercises the codebook
    for got, want in zip(q.f_to_idxBl_or_fhat(f_BChw, to_fhat=True), ref_fhat):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_nearest_code_ties_go_to_lowest_index() -> None:
    torch.manual_seed(0)
    q = MultiScaleVectorQuantizer(16, 4, patch_nums=(2,)).eval()  # one scale: the first lookup sees f itself
    with torch.no_grad():
        q.embedding.weight[9] = q.embedding.weight[4]
    f_BChw = q.embedding.weight[4].detach().reshape(1, -1, 1, 1).expand(1, -1, 2, 2).contiguous()
    assert q.f_to_idxBl_or_fhat(f_BChw, to_fhat=False)[0].tolist() == [[4, 4, 4, 4]]


def test_var_input_and_autoregressive_path_agree(quantizer_and_f) -> None:
    q, f_BChw = quantizer_and_f
    pns, S, C = SMALL["patch_nums"], len(SMALL["patch_nums"]), SMALL["z_channels"]
    idx = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=False)
    fhats = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)

    x_BLC = q.idxBl_to_var_input(idx)
    assert tuple(x_BLC.shape) == (2, sum(pn * pn for pn in pns) - pns[0] ** 2, C)
    torch.testing.assert_close(x_BLC, _ref_var_input(q, idx), atol=1e-5, rtol=0)

    # The AR loop, fed the same tokens, must rebuild the same f_hat and the same next-scale inputs.
    f_hat = torch.zeros(2, C, pns[-1], pns[-1])
    start = 0
    for si, pn in enumerate(pns):
        f_in, before = f_hat, f_hat.clone()
        f_hat, nxt = q.get_next_autoregressive_input(si, S, f_hat, q.embed_map(idx[si], pn))
        assert torch.equal(f_in, before)  # the caller's f_hat is not modified in place
        torch.testing.assert_close(f_hat, fhats[si], atol=1e-5, rtol=0)
        if si < S - 1:
            n = pns[si + 1] ** 2
            torch.testing.assert_close(nxt.flatten(2).transpose(1, 2), x_BLC[:, start : start + n], atol=1e-5, rtol=0)
            start += n
        else:
            assert nxt is f_hat
    assert start == x_BLC.shape[1]

    ms_h = [q.embed_map(i, pn) for i, pn in zip(idx, pns)]
    for got, want in zip(q.embed_to_fhat(ms_h), fhats):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.embed_to_fhat(ms_h, last_one=True), fhats[-1], atol=1e-5, rtol=0)


def test_quantizer_training_forward_is_straight_through(quantizer_and_f) -> None:
    q, f_BChw = quantizer_and_f
    q.train()
    f_BChw = f_BChw.clone().requires_grad_(True)
    f_hat_ste, loss = q(f_BChw)
    fhats = q.f_to_idxBl_or_fhat(f_BChw.detach(), to_fhat=True)
    torch.testing.assert_close(f_hat_ste, fhats[-1], atol=1e-5, rtol=0)
    ref_loss = sum(1.25 * F.mse_loss(fh, f_BChw.detach()) for fh in fhats) / len(fhats)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    f_hat_ste.sum().backward()
    torch.testing.assert_close(f_BChw.grad, torch.ones_like(f_BChw))  # identity gradient
    f_BChw.grad = None
    loss.backward()
    assert q.embedding.weight.grad.abs().sum() > 0 and f_BChw.grad.abs().sum() > 0


def test_attn_block_matches_reference() -> None:
    torch.manual_seed(0)
    blk, C = AttnBlock(32).eval(), 32
    x_BChw = torch.randn(2, C, 3, 4)
    qkv_B3Cl = F.conv2d(blk.norm(x_BChw), blk.qkv.weight, blk.qkv.bias).flatten(2)
    q, k, v = qkv_B3Cl[:, :C], qkv_B3Cl[:, C : 2 * C], qkv_B3Cl[:, 2 * C :]
    out = torch.empty(2, C, 12)
    for b in range(2):
        for i in range(12):  # query position i
            w = torch.softmax((q[b, :, i : i + 1] * k[b]).sum(0) / math.sqrt(C), dim=0)
            out[b, :, i] = (v[b] * w).sum(1)
    ref = x_BChw + F.conv2d(out.reshape(2, C, 3, 4), blk.proj_out.weight, blk.proj_out.bias)
    torch.testing.assert_close(blk(x_BChw), ref, atol=1e-5, rtol=0)


def test_image_round_trip() -> None:
    vae = build_vqvae(**SMALL)
    g = torch.Generator().manual_seed(3)
    x_B3HW = torch.rand(2, 3, SMALL_IMG_SIDE, SMALL_IMG_SIDE, generator=g) * 2 - 1
    with torch.no_grad():
        f_BChw = vae.img_to_f(x_B3HW)
        vae.quantize.embedding.weight.copy_(torch.randn(SMALL["vocab_size"], SMALL["z_channels"], generator=g))
        vae.quantize.embedding.weight.mul_(f_BChw.std())  # codes on the latent's scale: many distinct indices
        vae.decoder.conv_out.weight.mul_(100.0)  # push the raw output past [-1, 1] so that the clamp matters
    idx = vae.img_to_idxBl(x_B3HW)
    assert [tuple(i.shape) for i in idx] == [(2, pn * pn) for pn in SMALL["patch_nums"]]
    f_hat = vae.quantize.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)[-1]
    with torch.no_grad():
        img = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
        want = vae.fhat_to_img(f_hat)
        raw = vae.decoder(vae.post_quant_conv(f_hat))
    assert tuple(img.shape) == (2, 3, SMALL_IMG_SIDE, SMALL_IMG_SIDE)
    torch.testing.assert_close(img, want, atol=1e-5, rtol=0)
    assert raw.abs().max() > 1 and img.min() == -1 and img.max() == 1
    torch.testing.assert_close(vae.img_to_reconstructed_img(x_B3HW, last_one=True), want, atol=1e-5, rtol=0)
    assert len(vae.idxBl_to_img(idx, same_shape=True)) == len(SMALL["patch_nums"])
    assert tuple(vae.idxBl_to_var_input(idx).shape) == (2, sum(p * p for p in SMALL["patch_nums"]) - 1, 8)


def test_build_touches_no_global_state_and_is_deterministic() -> None:
    classes = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.BatchNorm2d)
    before = {cls: cls.reset_parameters for cls in classes}
    rng_before = torch.get_rng_state()
    a = build_vqvae(**SMALL)
    assert {cls: cls.reset_parameters for cls in classes} == before
    assert torch.equal(torch.get_rng_state(), rng_before)
    b, c = build_vqvae(**SMALL), build_vqvae(seed=1, **SMALL)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(sd_a["quant_conv.weight"], sd_c["quant_conv.weight"])
    assert all(torch.isfinite(v).all() for v in sd_a.values())
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_rejects_inconsistent_configuration() -> None:
    q = _strong_quantizer()
    with pytest.raises(ValueError, match="patch_nums ends at 8"):
        q.f_to_idxBl_or_fhat(torch.zeros(1, SMALL["z_channels"], 7, 7), to_fhat=False)
    with pytest.raises(ValueError, match="share_quant_resi"):
        MultiScaleVectorQuantizer(8, 4, (1, 2), share_quant_resi=1)


@pytest.mark.parametrize("channels", [(32, 32), (32, 64)])
def test_resnet_block_matches_reference(channels) -> None:
    # The residual sum is written into conv2's fresh output; the values must be shortcut(x) + h of the plain
    # composition, the input must stay untouched, and gradients must still flow.
    from varq.models.vae_blocks import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(*channels).eval()
    x = torch.randn(2, channels[0], 6, 6)
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h)))
    expected = block.nin_shortcut(x) + h
    x_before = x.clone()
    with torch.no_grad():
        got = block(x)
    assert torch.equal(got, expected) and torch.equal(x, x_before)
    x.requires_grad_(True)
    block(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
