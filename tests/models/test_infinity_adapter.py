"""Infinity's adapter: reconstruction stages reproduce the teacher-forced pass; cross-attention rows carry their text."""

from __future__ import annotations

import pytest
import torch

from varq.models.factory import strong_random_init_
from varq.models.infinity import TextCond, build_infinity
from varq.models.infinity_adapter import pack_cross_input, unpack_cross_input
from varq.models.infinity_scales import custom_schedule
from varq.models.lookup import adapter_for


@pytest.fixture(scope="module")
def tiny():
    model = build_infinity("infinity_tiny", schedule=custom_schedule(((1, 1), (2, 2), (3, 3))))
    return strong_random_init_(model, seed=7)


def _batch(model, N=3):
    g = torch.Generator().manual_seed(4)
    text = TextCond(torch.randn(N, 6, 256, generator=g), torch.tensor([6, 2, 4]))
    return text, torch.randn(N, model.L - 1, model.Cvae, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("kv_cached", [False, True])
def test_walking_the_stages_reproduces_teacher_forcing(tiny, kv_cached):
    adapter = adapter_for(tiny)
    text, x = _batch(tiny)
    stream = adapter.init_stream(text)
    out = None
    for stage in adapter.stages():
        out = adapter.run_stage(stage, adapter.stage_input(stage, stream, x), kv_cached=kv_cached)
        adapter.advance(stage, stream, out)
    assert torch.allclose(out, tiny(text, x), atol=1e-5)


def test_stage_order_and_kinds(tiny):
    stages = adapter_for(tiny).stages()
    assert [s.kind for s in stages[:5]] == ["embed", "adaln", "attn", "cross", "ffn"]
    assert stages[3].name == "block_chunks.0.module.0.ca" and stages[-1].kind == "head"
    assert len(stages) == 2 + 3 * tiny.depth + 2


def test_cross_rows_pack_and_unpack():
    img, text = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    packed = pack_cross_input(img, text, mask)
    assert packed.shape == (2, 8, 9)
    i2, t2, m2 = unpack_cross_input(packed[1:], 5)  # any subset of rows keeps its own text
    assert torch.equal(i2, img[1:]) and torch.equal(t2, text[1:]) and m2.view(-1).tolist() == [True, False, False]


def test_every_declared_linear_is_exactly_an_nn_linear(tiny):
    """Quantized-Linear swaps match ``type(m) is nn.Linear``; a subclass (the official SharedAdaLin) would be missed."""
    for site in adapter_for(tiny).linears():
        assert type(tiny.get_submodule(site.fqn)) is torch.nn.Linear, site.fqn


@torch.no_grad()
def test_rtn_quantizes_every_linear_and_attention_through_the_adapter(tiny):
    import copy

    from varq.config import BitsConfig
    from varq.quant.methods.rtn import RTNConfig, rtn_policy
    from varq.quant.model import quant_linears, quantize_var
    from varq.sample.bitwise import generate_bitwise

    text, x = _batch(tiny)
    fp = tiny(text, x)
    errors = {}
    for w in (8, 4):
        q = quantize_var(copy.deepcopy(tiny), rtn_policy(RTNConfig()), BitsConfig(name=f"w{w}a{w}", w_bits=w, a_bits=w))
        assert len(quant_linears(q)) == len(adapter_for(tiny).linears())
        assert all(sa.operand_quant is not None for sa in adapter_for(q).attention_modules().values())
        errors[w] = float((q(text, x) - fp).abs().mean() / fp.abs().mean())
        assert generate_bitwise(q, text, rng=torch.Generator().manual_seed(0)).codes_BdHW.shape == (3, 32, 3, 3)
    assert 0 < errors[8] < 0.05 < errors[4]


def test_brecq_reconstructs_every_stage_of_infinity(tiny):
    """The reconstruction engine walks Infinity's stages (cross-attention rows carry their text) end to end."""
    import copy

    from varq.config import BitsConfig
    from varq.quant.methods.brecq import Brecq, BrecqConfig

    text, x = _batch(tiny)

    class PromptCalib:  # what a text-to-image calibration set hands the engine: text rows and teacher inputs
        def teacher_batch(self, rows, device, with_uncond=False):
            return (tiny.cfg_pair(text), x.repeat(2, 1, 1)) if with_uncond else (text, x)

    method = Brecq(BrecqConfig(iters=3))
    q = method.calibrate(copy.deepcopy(tiny), PromptCalib(), BitsConfig(name="w4a4", w_bits=4, a_bits=4))
    report = method.report()
    assert report["recon_units"] == 2 + 3 * tiny.depth + 2 and report["recon_rows"] == 6
    with torch.no_grad():
        assert torch.isfinite(q(text, x)).all()


@torch.no_grad()
def test_last_block_output_is_the_hidden_state_the_head_reads(tiny):
    # calibration builders (DGC's sink features) hook this block; its output must be what the head's norm receives
    from tests.models.test_var_adapter import assert_last_block_feeds_the_head

    text, x = _batch(tiny)
    assert_last_block_feeds_the_head(tiny, lambda: tiny(text, x))
