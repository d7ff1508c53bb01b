"""Infinity's BSQ tokenizer: the released layout, multi-scale bit quantization, decoding and strict loading."""

from __future__ import annotations

import pytest
import torch

from varq.models.bsq_vae import BSQVAE, bsq_quantize, build_bsq_vae
from varq.models.checkpoint import CheckpointError
from varq.models.infinity_checkpoint import load_bsq_vae


def test_released_layout_and_parameter_count():
    with torch.device("meta"):
        vae = build_bsq_vae()
    state = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == 110_118_051 and len(state) == 270
    assert tuple(state["encoder.conv_in.conv.weight"].shape) == (128, 3, 3, 3)
    assert tuple(state["decoder.conv_out.conv.weight"].shape) == (3, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.conv.weight" in state and "encoder.down.4.downsample.conv.conv.weight" not in state
    assert "decoder.up.1.upsample.conv.conv.weight" in state and "decoder.up.0.upsample.conv.conv.weight" not in state
    assert {"quantizer.lfq.mask", "quantize.lfq.mask"} <= set(state)


def test_bsq_codes_are_signs_on_the_unit_sphere():
    z = torch.tensor([[[3.0], [-0.5], [0.25], [-8.0]]])  # (B=1, d=4, N=1)
    codes, bits = bsq_quantize(z, dim=1)
    assert bits.view(-1).tolist() == [1, 0, 1, 0]
    assert torch.allclose(codes.view(-1), torch.tensor([0.5, -0.5, 0.5, -0.5]))


class _GivenLatent(torch.nn.Module):
    def forward(self, x):
        return x  # the "images" are the latents themselves


def test_multiscale_bits_quantize_the_running_residual():
    vae = BSQVAE(codebook_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_size=2)
    vae.encoder = _GivenLatent()
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    bits, inputs = vae.img_to_bits(z, [(1, 1), (2, 2)])
    # scale 0: the mean token, quantized; it is constant over the 2×2 grid after upsampling
    c0 = torch.where(z.mean((2, 3)) > 0, 0.5, -0.5)  # ±1/√4
    assert bits[0].view(-1).tolist() == (z.mean((2, 3)) > 0).long().view(-1).tolist()
    residual = z - c0.view(1, 4, 1, 1)
    assert torch.equal(bits[1], (residual > 0).long().flatten(2).transpose(1, 2))
    # the teacher input of scale 1 is the scale-0 codes at 2×2
    assert torch.allclose(inputs, c0.view(1, 1, 4).expand(1, 4, 4))
    with pytest.raises(ValueError, match="latent grid"):
        vae.img_to_bits(z, [(1, 1), (3, 3)])


def test_decode_maps_codes_to_clamped_images():
    vae = BSQVAE(codebook_dim=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_size=4)
    img = vae.decode(torch.randn(2, 4, 3, 5))
    assert img.shape == (2, 3, 12, 20) and img.min() >= -1 and img.max() <= 1
    with torch.no_grad():
        expected = vae.decoder(torch.ones(1, 4, 2, 2)).clamp(-1, 1)
    assert torch.equal(vae.decode(torch.ones(1, 4, 2, 2)), expected)
    assert not torch.equal(expected, vae.decode(-torch.ones(1, 4, 2, 2)))


def test_strict_loading_unwraps_vae_and_names_the_key():
    a = BSQVAE(codebook_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_size=2)
    b = BSQVAE(codebook_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_size=2)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    load_bsq_vae(b, {"vae": a.state_dict()}, "vae.pth", "model.vae_ckpt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    broken = dict(a.state_dict())
    del broken["decoder.conv_out.conv.bias"]
    with pytest.raises(CheckpointError, match="model.vae_ckpt"):
        load_bsq_vae(b, {"vae": broken}, "vae.pth", "model.vae_ckpt")
