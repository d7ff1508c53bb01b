"""eval.decoder=winograd: Winograd F(4×4, 3×3) convolutions in the decoders.

The transform matrices are checked exactly (rational arithmetic) against the correlation they must compute and against
the matrices published for the points (0, ±1, ±2, ∞); the convolution is checked in float64, where a wrong transform
entry, tile offset or band boundary shows as an O(1) difference and rounding stays below ~1e-13.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import varq.models.winograd as wg
from tests.tiny import tiny_vqvae
from varq.models.bsq_vae import BSQVAE
from varq.models.fast_decoder import decoder_mode, set_decoder
from varq.models.winograd import WinogradConv2d, toom_cook, winograd_conv2d


def _apply(rows, vec):
    return [sum((a * b for a, b in zip(row, vec)), Fraction(0)) for row in rows]


@pytest.mark.parametrize("m, r, points", [(4, 3, wg.POINTS), (2, 3, (0, 1, -1)), (3, 2, (0, 1, Fraction(-1, 2))),
                                          (4, 3, (0, 1, -1, 2, -2))])
def test_toom_cook_computes_the_correlation_exactly(m, r, points):
    points = tuple(Fraction(p) for p in points)
    a_t, g, b_t = toom_cook(m, r, points)
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(5):
        d = [Fraction(int(v), int(q)) for v, q in zip(rng.integers(-9, 10, m + r - 1), rng.integers(1, 7, m + r - 1))]
        w = [Fraction(int(v), int(q)) for v, q in zip(rng.integers(-9, 10, r), rng.integers(1, 7, r))]
        y = _apply(a_t, [gw * bd for gw, bd in zip(_apply(g, w), _apply(b_t, d))])
        assert y == [sum((d[i + k] * w[k] for k in range(r)), Fraction(0)) for i in range(m)]


def test_toom_cook_on_the_usual_points_gives_the_published_matrices():
    # the F(4×4, 3×3) matrices on the points (0, 1, -1, 2, -2, ∞) as published by Lavin & Gray (2016)
    a_t, g, b_t = toom_cook(4, 3, tuple(Fraction(p) for p in (0, 1, -1, 2, -2)))
    assert b_t == [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    f = Fraction
    assert g == [[f(1, 4), 0, 0], [f(-1, 6), f(-1, 6), f(-1, 6)], [f(-1, 6), f(1, 6), f(-1, 6)],
                 [f(1, 24), f(1, 12), f(1, 6)], [f(1, 24), f(-1, 12), f(1, 6)], [0, 0, 1]]
    assert a_t == [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def test_toom_cook_on_the_shipped_points_has_the_hand_computed_entries():
    a_t, g, b_t = toom_cook(4, 3)
    # p = 2: 1 / ((2-0)(2-1)(2+1)(2+1/2)) = 1/15; p = -1/2: row of (x)(x-1)(x+1)(x-2) = x⁴ - 2x³ - x² + 2x
    assert g[3] == [Fraction(1, 15), Fraction(2, 15), Fraction(4, 15)]
    assert b_t[4] == [0, 2, -1, -2, 1, 0]
    assert [row[4] for row in a_t] == [1, Fraction(-1, 2), Fraction(1, 4), Fraction(-1, 8)]


def test_toom_cook_refuses_repeated_or_missing_points():
    with pytest.raises(ValueError, match="distinct"):
        toom_cook(4, 3, (Fraction(0), Fraction(1), Fraction(1), Fraction(2), Fraction(3)))
    with pytest.raises(ValueError, match="5 distinct"):
        toom_cook(4, 3, (Fraction(0), Fraction(1)))


@pytest.mark.parametrize("band_bytes", [1, 5 << 18, 1 << 40], ids=["one_tile_row", "default", "whole_batch"])
@pytest.mark.parametrize("shape", [(2, 32, 48, 13, 10), (3, 40, 32, 8, 8), (1, 33, 35, 5, 7), (2, 32, 32, 1, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_conv_equals_the_direct_conv_in_float64(shape, with_bias, band_bytes, monkeypatch):
    monkeypatch.setattr(wg, "BAND_BYTES", band_bytes)
    B, C, O, H, W = shape
    gen = torch.Generator().manual_seed(H * W + C)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    weight = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(O, generator=gen, dtype=torch.float64) if with_bias else None
    expected = F.conv2d(x, weight, bias, padding=1)
    transforms = wg._Transforms(weight, torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = winograd_conv2d(x.contiguous(memory_format=fmt), transforms, bias, padding=1)
        assert got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_winograd_fp32_rounding_stays_near_the_direct_convs():
    # the shipped points keep F(4×4, 3×3) within ~7× the direct conv's fp32 error (0, ±1, ±2 would be ~24×)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 36, 36, generator=gen)
    weight, bias = torch.randn(32, 64, 3, 3, generator=gen) / 24, torch.randn(32, generator=gen)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    direct_err = (F.conv2d(x, weight, bias, padding=1).double() - exact).abs().max()
    wino_err = (winograd_conv2d(x, wg._Transforms(weight, torch.float32), bias, padding=1).double() - exact).abs().max()
    assert 0 < wino_err < 12 * direct_err


def _conv(c_in=32, c_out=32, dtype=torch.float32):
    conv = WinogradConv2d(c_in, c_out, 3, padding=1).to(dtype)
    conv.winograd.enabled = True
    return conv


def _count_calls(monkeypatch) -> list:
    calls = []
    real = wg.winograd_conv2d
    monkeypatch.setattr(wg, "winograd_conv2d", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def test_the_conv_module_takes_the_path_only_where_it_applies(monkeypatch):
    calls = _count_calls(monkeypatch)
    x = torch.randn(1, 32, 8, 8)
    conv = _conv()
    with torch.no_grad():
        got = conv(x)
        assert len(calls) == 1
        torch.testing.assert_close(got, F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=0, atol=1e-4)
        conv.winograd.enabled = False
        conv(x)
        conv.winograd.enabled = True
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 transforms would lose the accuracy: direct conv
            conv(x)
        _conv(dtype=torch.bfloat16)(x.bfloat16())
        _conv(c_in=16)(torch.randn(1, 16, 8, 8))  # too thin to gain
    conv(x)  # autograd on: the banded output is written in place, so the direct conv runs
    assert len(calls) == 1


def test_the_cached_transforms_follow_new_and_edited_weights():
    conv = _conv(dtype=torch.float64)
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    other = torch.randn_like(conv.weight)
    with torch.no_grad():
        conv(x)  # derives and caches U of the first weights
        conv.load_state_dict({"weight": other, "bias": conv.bias.clone()})
        torch.testing.assert_close(conv(x), F.conv2d(x, other, conv.bias, padding=1), rtol=0, atol=1e-10)
        conv.weight.mul_(-1.0)  # same storage, new version
        torch.testing.assert_close(conv(x), F.conv2d(x, -other, conv.bias, padding=1), rtol=0, atol=1e-10)


def _bsq():
    return BSQVAE(codebook_dim=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_size=4).eval()


def _decode(vae, z):
    return vae.fhat_to_img(z) if hasattr(vae, "fhat_to_img") else vae.decode(z)


def _latent(vae, dtype=torch.float32):
    channels = vae.Cvae if hasattr(vae, "Cvae") else vae.codebook_dim
    return torch.randn(2, channels, 5, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)


def _eligible(decoder) -> int:
    # the upsample convs take the fast decoder's phase path instead (their weights, another conv)
    upsample = {id(getattr(m.conv, "conv", m.conv)) for m in decoder.modules() if hasattr(m, "phase")}
    return sum(1 for m in decoder.modules() if isinstance(m, WinogradConv2d) and id(m) not in upsample
               and m.winograd.applies(torch.empty(1, m.in_channels, 4, 4, dtype=m.weight.dtype), m))


@pytest.mark.parametrize("make", [tiny_vqvae, _bsq], ids=["var_vqvae", "infinity_bsq_vae"])
def test_winograd_decoder_computes_the_reference_decoder(make, monkeypatch):
    vae = make().double()
    z = _latent(vae, torch.float64)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        expected = _decode(vae, z)
        assert calls == []
        assert set_decoder(vae, "winograd") == "reference"
        got = _decode(vae, z)
    assert _eligible(vae.decoder) >= 4 and len(calls) == _eligible(vae.decoder)  # every eligible conv, once
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", [tiny_vqvae, _bsq], ids=["var_vqvae", "infinity_bsq_vae"])
def test_switching_modes_restores_each_decoder_and_keeps_the_state_dict(make, monkeypatch):
    vae = make()
    z = _latent(vae)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        expected = _decode(vae, z)
        set_decoder(vae, "fast")
        fast = _decode(vae, z)
        assert set_decoder(vae, "winograd") == "fast"
        wino = _decode(vae, z)
        assert vae.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
        assert set_decoder(vae, "fast") == "winograd"
        paths = [m.winograd for m in vae.decoder.modules() if isinstance(m, WinogradConv2d)]
        assert paths and not any(p.enabled or p._transforms is not None for p in paths)  # U is not kept
        assert torch.equal(_decode(vae, z), fast)
        with decoder_mode(vae, "reference"):
            assert torch.equal(_decode(vae, z), expected)
    torch.testing.assert_close(wino, expected, rtol=0, atol=1e-4)  # fp32: only rounding apart


def test_a_decoder_without_winograd_convs_is_refused():
    vae = tiny_vqvae()
    for m in vae.decoder.modules():
        if isinstance(m, WinogradConv2d):
            m.winograd = object()  # as a decoder built from plain nn.Conv2d
    with pytest.raises(ValueError, match="eval.decoder=fast"):
        set_decoder(vae, "winograd")


def test_generate_to_dir_turns_the_winograd_path_on_and_off(tmp_path):
    from varq.config import EvalConfig
    from varq.sample.generate import generate_to_dir

    vae = tiny_vqvae()
    seen = []

    class Task:
        def plan(self, cfg):
            from varq.sample.tasks import ClassCondTask

            return ClassCondTask(num_classes=2).plan(cfg)

        def generate_batch(self, var, vqvae, plan, cfg, device):
            seen.append(all(m.winograd.enabled for m in vqvae.decoder.modules() if isinstance(m, WinogradConv2d)))
            return np.zeros((len(plan.labels), 3, 4, 4), dtype=np.uint8)

    cfg = EvalConfig(samples_per_class=1, classes=[0, 1], batch_size=1, decoder="winograd")
    assert generate_to_dir(None, vae, cfg, 2, tmp_path / "samples", torch.device("cpu"), task=Task()) == 2
    assert seen == [True, True]
    assert not any(m.winograd.enabled for m in vae.decoder.modules() if isinstance(m, WinogradConv2d))


def test_the_encoder_keeps_its_direct_convs():
    vae = copy.deepcopy(tiny_vqvae())
    set_decoder(vae, "winograd")
    assert not any(m.winograd.enabled for m in vae.encoder.modules() if isinstance(m, WinogradConv2d))
