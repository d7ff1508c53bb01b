"""Bitwise sampling of Infinity: guidance on logits, tau, per-bit top-p, codes and the next scale's input."""

from __future__ import annotations

import math

import pytest
import torch

from varq.models.factory import strong_random_init_
from varq.models.infinity import TextCond, build_infinity
from varq.models.infinity_scales import custom_schedule
from varq.sample.bitwise import bits_to_codes, generate_bitwise, per_scale, teacher_inputs


@pytest.fixture(scope="module")
def tiny():
    model = build_infinity("infinity_tiny", schedule=custom_schedule(((1, 1), (2, 2), (3, 3), (5, 4))))
    return strong_random_init_(model, seed=5)


def _text():
    g = torch.Generator().manual_seed(2)
    return TextCond(torch.randn(2, 5, 256, generator=g), torch.tensor([5, 2]))


def _sample(model, seed=0, **kw):
    caught = {}
    out = generate_bitwise(
        model, _text(), rng=torch.Generator().manual_seed(seed),
        on_logits=lambda si, logits: caught.__setitem__(si, logits.clone()), **kw,
    )
    return out, caught


def test_bits_to_codes_are_unit_norm_plus_minus_one_over_sqrt_d():
    bits = torch.tensor([[1, 0, 0, 1]])
    codes = bits_to_codes(bits, 4)
    assert torch.allclose(codes, torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_draws_follow_guided_tempered_top_p_bit_probabilities(tiny):
    """Replay every scale's draw from the captured logits with an independent two-value top-p: same bits."""
    cfg, tau, top_p = 2.5, 0.7, 0.9
    out, caught = _sample(tiny, cfg=cfg, tau=tau, top_p=top_p)
    g = torch.Generator().manual_seed(0)
    for si, logits_2BlV in caught.items():
        B = logits_2BlV.shape[0] // 2
        mixed = cfg * logits_2BlV[:B] + (1 - cfg) * logits_2BlV[B:]
        p1 = mixed.view(B, -1, 2).softmax(-1)  # (B, l·d, 2)
        p_small = p1.min(-1, keepdim=True).values
        keep = ~((p1 == p_small) & (p_small <= 1 - top_p))  # a bit value with probability ≤ 1 − p is dropped
        probs = torch.where(keep, p1, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
        expected = torch.multinomial(probs.view(-1, 2), 1, generator=g).view(B, -1, tiny.Cvae)
        assert torch.equal(out.bits_Bld[si], expected), si


def test_tau_divides_the_logits_before_guidance(tiny):
    _, plain = _sample(tiny, cfg=1.0, tau=1.0)
    _, hot = _sample(tiny, cfg=1.0, tau=0.5)
    assert torch.allclose(hot[0], 2 * plain[0], atol=1e-5)  # the first scale sees no sampled input yet


def test_sampled_bits_are_the_teacher_forcing_inputs(tiny):
    """Teacher forcing on the codes built from the drawn bits reproduces every cached step's logits."""
    tau = 0.8
    out, caught = _sample(tiny, cfg=3.0, tau=tau)
    text = _text()
    with torch.no_grad():
        teacher = tiny(tiny.cfg_pair(text), teacher_inputs(tiny, out.bits_Bld).repeat(2, 1, 1))
    for si, (b, e) in enumerate(tiny.begin_ends):
        assert torch.allclose(caught[si] * tau, teacher[:, b:e], atol=1e-4), si
    # the final codes are the sum of every scale's codes resized to the last grid
    assert out.codes_BdHW.shape == (2, tiny.Cvae, 5, 4)


def test_seeded_sampling_is_reproducible_and_the_reference_loop_agrees(tiny):
    a, _ = _sample(tiny, seed=3)
    b, _ = _sample(tiny, seed=3)
    c = generate_bitwise(tiny, _text(), rng=torch.Generator().manual_seed(3), reference_loop=True)
    d, _ = _sample(tiny, seed=4)
    for x, y, z in zip(a.bits_Bld, b.bits_Bld, c.bits_Bld):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert not all(torch.equal(x, w) for x, w in zip(a.bits_Bld, d.bits_Bld))


def test_decoder_output_is_mapped_to_unit_range(tiny):
    out = generate_bitwise(tiny, _text(), rng=torch.Generator().manual_seed(0), decode=lambda c: c[:, :3] * 0 - 1)
    assert out.images_B3HW.shape == (2, 3, 5, 4) and torch.equal(out.images_B3HW, torch.zeros(2, 3, 5, 4))


def test_per_scale_settings_and_bad_values():
    assert per_scale(3, 2, "cfg") == [3.0, 3.0]
    assert per_scale([1, 2, 3], 2, "cfg") == [1.0, 2.0]
    with pytest.raises(ValueError, match="cfg lists 1 values"):
        per_scale([1.0], 2, "cfg")


def test_nonpositive_tau_is_refused(tiny):
    with pytest.raises(ValueError, match="tau"):
        generate_bitwise(tiny, _text(), tau=0.0)
    assert math.isfinite(per_scale(0.5, 1, "tau")[0])


def test_next_scale_input_is_the_running_code_sum_resized():
    """Closed form on a (1,1) → (2,2) → (4,4) schedule: inputs are c0, then c0 + bilinear-upsampled c1 at 4×4."""
    import torch.nn.functional as F

    model = build_infinity("infinity_tiny", schedule=custom_schedule(((1, 1), (2, 2), (4, 4))), codebook_dim=4)
    g = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (1, n, 4), generator=g) for n in (1, 4, 16)]
    inputs = teacher_inputs(model, bits)
    c0 = bits_to_codes(bits[0], 4).view(1, 1, 4)
    c1_B4hw = bits_to_codes(bits[1], 4).view(1, 2, 2, 4).permute(0, 3, 1, 2)
    assert torch.allclose(inputs[:, :4], c0.expand(1, 4, 4))
    up = F.interpolate(c1_B4hw, size=(4, 4), mode="bilinear", align_corners=False)
    expected = (c0.view(1, 4, 1, 1) + up).flatten(2).transpose(1, 2)
    assert torch.allclose(inputs[:, 4:], expected, atol=1e-6)


def test_fp16_text_features_and_bf16_autocast(tiny):
    """T5 features arrive in fp16; the official inference runs the blocks under bf16 autocast."""
    text = _text()
    half = TextCond(text.features_BLtC.half(), text.lens_B)
    rounded = TextCond(half.features_BLtC.float(), text.lens_B)
    a = generate_bitwise(tiny, half, rng=torch.Generator().manual_seed(0))
    b = generate_bitwise(tiny, rounded, rng=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.bits_Bld, b.bits_Bld))
    c = generate_bitwise(tiny, half, rng=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16)
    agree = torch.cat([(x == y).float().view(-1) for x, y in zip(a.bits_Bld, c.bits_Bld)]).mean()
    assert agree > 0.9  # bf16 moves a few near-even bits, not the sample
