"""eval.decoder=fast: the same decoder function as the reference one, computed in another layout and order.

Equality is checked in float64, where a wrong tap, phase or offset shows as an O(1) difference and rounding cannot
exceed ~1e-13; fp32 only bounds the rounding the option introduces.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny import tiny_vqvae
from varq.models.bsq_vae import BSQVAE
from varq.models.fast_decoder import decoder_mode, phase_kernels, set_decoder, upsample_conv_phases


def _reference_upsample_conv(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def test_phase_kernels_sum_the_taps_each_phase_sees():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # w[r, c] = 3r + c
    k = phase_kernels(w)
    assert k.shape == (4, 1, 2, 2)
    rows0 = [[0, 1, 2], [3 + 6, 4 + 7, 5 + 8]]  # phase a=0 reads rows (i-1, i): taps (w0, w1+w2)
    rows1 = [[0 + 3, 1 + 4, 2 + 5], [6, 7, 8]]  # phase a=1 reads rows (i, i+1): taps (w0+w1, w2)

    def cols(rows, b):
        return [[r[0], r[1] + r[2]] if b == 0 else [r[0] + r[1], r[2]] for r in rows]

    expected = [cols(rows0, 0), cols(rows0, 1), cols(rows1, 0), cols(rows1, 1)]  # p = 2a + b
    assert k[:, 0].tolist() == expected


def test_phase_kernels_refuse_other_kernel_sizes():
    with pytest.raises(ValueError, match="3x3"):
        phase_kernels(torch.zeros(2, 2, 5, 5))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 8, 4, 4), (3, 2, 1, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsample_conv_phases_equals_nearest_upsample_then_conv(shape, with_bias):
    g = torch.Generator().manual_seed(sum(shape))
    B, C, h, w = shape
    O = 5
    x = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(O, generator=g, dtype=torch.float64) if with_bias else None
    expected = _reference_upsample_conv(x, weight, bias)
    bias4 = None if bias is None else bias.repeat(4)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = upsample_conv_phases(x.contiguous(memory_format=fmt), phase_kernels(weight), bias4, O)
        assert got.shape == expected.shape == (B, O, 2 * h, 2 * w)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _bsq():
    return BSQVAE(codebook_dim=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_size=4).eval()


def _decode(vae, z):
    return vae.fhat_to_img(z) if hasattr(vae, "fhat_to_img") else vae.decode(z)


def _latent(vae, dtype=torch.float32):
    channels = vae.Cvae if hasattr(vae, "Cvae") else vae.codebook_dim
    return torch.randn(2, channels, 5, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)


@pytest.mark.parametrize("make", [tiny_vqvae, _bsq], ids=["var_vqvae", "infinity_bsq_vae"])
def test_fast_decoder_computes_the_reference_decoder(make):
    vae = make().double()
    z = _latent(vae, torch.float64)
    with torch.no_grad():
        expected = _decode(vae, z)
        set_decoder(vae, "fast")
        got = _decode(vae, z)
    assert got.is_contiguous()  # NCHW out, whatever layout it computed in
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", [tiny_vqvae, _bsq], ids=["var_vqvae", "infinity_bsq_vae"])
def test_fast_decoder_runs_the_phase_path_in_channels_last(make, monkeypatch):
    import varq.models.fast_decoder as fd

    vae = make()
    calls = []
    real = fd.upsample_conv_phases
    monkeypatch.setattr(fd, "upsample_conv_phases", lambda *a: calls.append(a[0].shape) or real(*a))
    set_decoder(vae, "fast")
    conv = next(m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _decode(vae, _latent(vae))
    n_up = sum(1 for m in vae.decoder.modules() if hasattr(m, "phase"))
    assert n_up > 0 and len(calls) == n_up


@pytest.mark.parametrize("make", [tiny_vqvae, _bsq], ids=["var_vqvae", "infinity_bsq_vae"])
def test_switching_back_restores_the_reference_bit_for_bit_and_keeps_the_state_dict(make):
    vae = make()
    z = _latent(vae)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        expected = _decode(vae, z)
        with decoder_mode(vae, "fast"):
            fast = _decode(vae, z)
            assert vae.state_dict().keys() == state.keys()
            assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
        again = _decode(vae, z)
    assert torch.equal(again, expected)
    phases = [m.phase for m in vae.decoder.modules() if hasattr(m, "phase")]
    assert phases and all(p._kernels is None for p in phases)  # the derived kernels are not kept around
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-4)  # fp32: only rounding apart


def test_new_weights_are_picked_up_by_the_cached_phase_kernels():
    vae = tiny_vqvae()
    other = copy.deepcopy(vae)
    with torch.no_grad():
        for p in other.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z = _latent(vae)
    set_decoder(vae, "fast")
    with torch.no_grad():
        _decode(vae, z)  # derives and caches the kernels of the old weights
        vae.load_state_dict(other.state_dict())
        got = _decode(vae, z)
        expected = _decode(other, z)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # in-place edits (same storage, new version) are seen too
    with torch.no_grad():
        for m in vae.decoder.modules():
            if hasattr(m, "phase"):
                m.conv.weight.mul_(-1.0)
        flipped = _decode(vae, z)
    assert (flipped - got).abs().max() > 1e-2


def test_bad_modes_and_vaes_without_a_fast_path_are_refused():
    vae = tiny_vqvae()
    with pytest.raises(ValueError, match="eval.decoder='turbo'"):
        set_decoder(vae, "turbo")
    no_decoder = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="eval.decoder=reference"):
        set_decoder(no_decoder, "fast")
    with decoder_mode(no_decoder, "reference"):  # the default never touches a model without a fast path
        pass


def test_generate_to_dir_decodes_with_the_configured_decoder(tmp_path):
    from varq.config import EvalConfig
    from varq.sample.generate import generate_to_dir

    vae = tiny_vqvae()
    seen = []

    class Task:
        def plan(self, cfg):
            from varq.sample.tasks import ClassCondTask

            return ClassCondTask(num_classes=2).plan(cfg)

        def generate_batch(self, var, vqvae, plan, cfg, device):
            ups = [m.phase.enabled for m in vqvae.decoder.modules() if hasattr(m, "phase")]
            seen.append(all(ups) and len(ups) > 0)
            return np.zeros((len(plan.labels), 3, 4, 4), dtype=np.uint8)

    for mode, expected in (("fast", True), ("reference", False)):
        seen.clear()
        cfg = EvalConfig(samples_per_class=1, classes=[0, 1], batch_size=1, decoder=mode)
        made = generate_to_dir(None, vae, cfg, 2, tmp_path / mode / "samples", torch.device("cpu"), task=Task())
        assert made == 2 and seen == [expected, expected]
    assert not any(m.phase.enabled for m in vae.decoder.modules() if hasattr(m, "phase"))  # restored afterwards


def test_fast_decoder_under_bf16_autocast_stays_within_bf16_rounding():
    vae = tiny_vqvae()
    z = _latent(vae)
    with torch.no_grad():
        exact = _decode(copy.deepcopy(vae).double(), z.double()).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = _decode(vae, z).float()
            with decoder_mode(vae, "fast"):
                fast = _decode(vae, z).float()
    # both are bf16 computations of the same function: each is as far from the exact result as the other
    err_ref, err_fast = (ref - exact).abs().max(), (fast - exact).abs().max()
    assert err_fast <= 2 * err_ref + 1e-3
