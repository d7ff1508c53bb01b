"""The vectorised attention pass of reconstruction (`varq.quant.prefix_attention`) against the KV-cached steps.

Tolerances: outputs and AdaRound gradients agree to rtol 1e-5 (atol 1e-5 of the largest entry): the same maths with
fp32 sums in another order (the concatenated row holds exact zeros outside its block).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.tiny import PATCH_NUMS, tiny_var
from varq.config import BitsConfig
from varq.models.lookup import adapter_for
from varq.quant.attention import AttentionOperandQuant
from varq.quant.factories import dynamic_quantizer
from varq.quant.granularity import PerAxes, PerGroup, PerScale, PerTensor, PerToken
from varq.quant.methods.brecq import BrecqConfig
from varq.quant.methods.ours import OursConfig, ShiftAndSum
from varq.quant.model import quantize_var
from varq.quant.prefix_attention import check_vectorisable, prefix_layout, prefix_ranges, quantize_keys
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.recon import ReconConfig, reconstruct
from varq.quant.recon.adaround import install_adaround
from varq.quant.recon.engine import _check_attention_pass
from varq.quant.recon.units import stage_linears
from varq.quant.rounding import AdaRoundRounding
from varq.quant.shift_sum import ShiftSumAV, key_orders, record_importance, set_theta

W4A4, W6A6, W8A8 = BitsConfig("w4a4", 4, 4), BitsConfig("w6a6", 6, 6), BitsConfig("w8a8", 8, 8)
RTOL = 1e-5
ENDS = tuple(torch.tensor([pn * pn for pn in PATCH_NUMS]).cumsum(0).tolist())  # (1, 5, 21)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def _quantized(method: str, bits: BitsConfig, theta: float = 0.02) -> nn.Module:
    var = copy.deepcopy(tiny_var())
    if method == "ours":
        qvar = ShiftAndSum(OursConfig(iters=0, shift_sum=True, reestimate_theta=False)).quantize(var, bits)
        set_theta(qvar, theta)
        return qvar
    from varq.quant.methods.brecq import framework_policy

    return quantize_var(var, framework_policy(BrecqConfig()), bits)


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("method, bits", [("ours", W4A4), ("ours", W6A6), ("ours", W8A8), ("brecq", W4A4),
                                          ("brecq", W6A6)])
@pytest.mark.parametrize("block_idx", [0, 1])
def test_vectorised_stage_equals_the_cached_steps_with_their_gradients(method, bits, block_idx):
    qvar = _quantized(method, bits)
    adapter = adapter_for(qvar)
    # W6A6: K per (b, h, channel) over the visible keys (prefix ranges); W4A4: per key token (gathered rows)
    k_gran = qvar.blocks[block_idx].attn.operand_quant.k_quantizer.spec.granularity
    assert isinstance(k_gran, PerToken if bits is W4A4 else PerAxes)
    stage = next(s for s in adapter.stages() if s.kind == "attn" and s.block_idx == block_idx)
    roundings = [install_adaround(linear) for linear in stage_linears(qvar, stage).values()]
    proj = qvar.blocks[block_idx].attn.proj
    attn_out: list[torch.Tensor] = []
    proj.register_forward_pre_hook(lambda _m, args: attn_out.append(args[0].detach()))
    x_BLC = torch.randn(3, adapter.model.L, 64, generator=torch.Generator().manual_seed(1))

    # 1. every quantizer on: the attention output (proj's input), with and without autograd (the in-place kernels)
    for grad in (True, False):
        attn_out.clear()
        with torch.set_grad_enabled(grad):
            for attention_pass in ("cached", "vectorised"):
                adapter.run_stage(stage, x_BLC, attention_pass=attention_pass)
        _close(attn_out[-1], torch.cat(attn_out[:-1], dim=1))  # the cached pass calls proj once per scale

    # 2. the unit's output and the gradient of every α. proj's 4-bit per-token input grid is switched off here:
    # Â·V̂ of log2 codes lands on exact ties of that grid, where a last-bit difference of a softmax sum (the
    # concatenated row sums 27 entries, the cached step 5) may pick the other code, a legitimate rounding change
    proj.input_quantizer.enabled = False
    results = {}
    for attention_pass in ("cached", "vectorised"):
        for r in roundings:
            r.alpha.grad = None
        out = adapter.run_stage(stage, x_BLC, attention_pass=attention_pass)
        (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
        results[attention_pass] = out.detach(), [r.alpha.grad.clone() for r in roundings]
    (out_c, grads_c), (out_v, grads_v) = results["cached"], results["vectorised"]
    _close(out_v, out_c)
    assert len(grads_c) == 2 and all(float(g.abs().max()) > 0 for g in grads_c)
    for g_v, g_c in zip(grads_v, grads_c):
        _close(g_v, g_c)


def test_shift_and_sum_rows_matter_in_the_vectorised_pass():
    # θ must change the vectorised output (its finer rows are really used), and equally in both passes
    qvar = _quantized("ours", W6A6)
    adapter = adapter_for(qvar)
    stage = next(s for s in adapter.stages() if s.kind == "attn")
    x_BLC = torch.randn(2, adapter.model.L, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on = {p: adapter.run_stage(stage, x_BLC, attention_pass=p) for p in ("cached", "vectorised")}
        set_theta(qvar, math.inf)
        off = adapter.run_stage(stage, x_BLC, attention_pass="vectorised")
    assert not torch.allclose(on["vectorised"], off, rtol=1e-3, atol=1e-4)
    _close(on["vectorised"], on["cached"])


def test_importance_and_orders_per_scale_equal_the_cached_records():
    qvar = _quantized("ours", W4A4)
    adapter = adapter_for(qvar)
    stage = next(s for s in adapter.stages() if s.kind == "attn" and s.block_idx == 0)
    x_BLC = torch.randn(2, adapter.model.L, 64, generator=torch.Generator().manual_seed(3))
    records = {}
    for attention_pass in ("cached", "vectorised"):
        with torch.no_grad(), record_importance(qvar) as got:
            adapter.run_stage(stage, x_BLC, attention_pass=attention_pass)
        records[attention_pass] = got
    cached, vectorised = records["cached"], records["vectorised"]
    assert [(r.block_idx, r.scale_idx, r.num_queries) for r in vectorised] == [(0, 0, 1), (0, 1, 4), (0, 2, 16)]
    assert [(r.block_idx, r.scale_idx, r.num_queries) for r in cached] == [(0, k, n) for k, n in enumerate((1, 4, 16))]
    theta = float(qvar.blocks[0].attn.operand_quant.av_matmul.theta)
    for rc, rv in zip(cached, vectorised):
        assert rv.importance_BHS.shape == rc.importance_BHS.shape == (2, 1, ENDS[rc.scale_idx])
        torch.testing.assert_close(rv.importance_BHS, rc.importance_BHS, rtol=1e-6, atol=1e-7)
        assert torch.equal(key_orders(rv.importance_BHS, theta), key_orders(rc.importance_BHS, theta))
    assert any(int(key_orders(r.importance_BHS, theta).max()) >= 1 for r in cached)  # some rows are finer


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_masked_softmax_entries_quantize_to_exact_zeros(bits):
    # the quantizer sees MASKED_FLOOR at hidden entries (a fast log2); at 8+ bits its code would be non-zero
    from varq.quant.prefix_attention import _quantize_softmax

    layout = prefix_layout((1, 3, 6))
    logits = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(bits)) * 4
    attn = (logits + layout.bias_LT).softmax(-1).requires_grad_(True)
    q = dynamic_quantizer(QuantSpec(bits, "log2", PerToken()))
    got = _quantize_softmax(q, attn, layout)
    assert torch.equal(got.detach(), q(attn.detach())) and bool((got.detach()[..., layout.hidden_LT] == 0).all())
    got.backward(torch.full_like(attn, 3.0))  # identity straight-through gradient, as the quantizer's own
    assert torch.equal(attn.grad, torch.full_like(attn, 3.0))


# ------------------------------------------------------------------------------------------------ prefix ranges
def test_prefix_ranges_grow_with_the_scales_by_hand():
    # one head, two channels, scales ending at (1, 3, 6): channel 0 is small until an outlier 8.0 at scale 2
    k_BHSc = torch.tensor([[[[0.5, -1.0], [1.0, 0.0], [-0.5, 1.0], [8.0, 0.5], [0.25, -2.0], [0.0, 0.0]]]])
    layout = prefix_layout((1, 3, 6))
    assert layout.key_idx_T.tolist() == [0, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert layout.block_T.tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert layout.rows_T.tolist() == [1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    assert torch.isinf(layout.bias_LT).sum() == 6 * 10 - (1 * 1 + 2 * 3 + 3 * 6)
    lo, hi = prefix_ranges(k_BHSc, PerAxes((0, 1, 3)), layout)
    # block k: min/max over keys 0..S_k-1 per channel
    expected_lo = [[0.5, -1.0]] + [[-0.5, -1.0]] * 3 + [[-0.5, -2.0]] * 6
    expected_hi = [[0.5, -1.0]] + [[1.0, 1.0]] * 3 + [[8.0, 1.0]] * 6
    assert lo[0, 0].tolist() == expected_lo and hi[0, 0].tolist() == expected_hi

    q = dynamic_quantizer(QuantSpec(4, "uniform", PerAxes((0, 1, 3))))
    k_cat = quantize_keys(q, "prefix", k_BHSc, layout)
    # block 1, channel 0 by hand: Δ = (1.0 − (−0.5))/15 = 0.1, z = round(0.5/0.1) = 5: keys 0.5, 1.0, −0.5 are on
    # the grid; with the full-sequence range (Δ = 8.5/15) they would not be
    step = 1.5 / 15
    codes = [min(max(round(v / step) + 5, 0), 15) for v in (0.5, 1.0, -0.5)]
    torch.testing.assert_close(k_cat[0, 0, 1:4, 0], torch.tensor([(c - 5) * step for c in codes]))
    for k, end in enumerate((1, 3, 6)):  # every block is the quantizer on its prefix, as a cached step runs it
        begin = sum((1, 3, 6)[:k])
        assert torch.equal(k_cat[:, :, begin : begin + end], q(k_BHSc[:, :, :end]))
    assert not torch.allclose(k_cat[:, :, 1:4], q(k_BHSc)[:, :, :3])


def test_per_tensor_ranges_over_the_keys_are_prefix_ranges_too():
    v_BHSc = torch.randn(2, 3, 6, 4, generator=torch.Generator().manual_seed(4))
    v_BHSc[1, 2, 5, 3] = 30.0  # the last scale's outlier
    layout = prefix_layout((1, 3, 6))
    q = dynamic_quantizer(QuantSpec(4, "uniform", PerTensor()))
    v_cat = quantize_keys(q, "prefix", v_BHSc, layout)
    for k, end in enumerate((1, 3, 6)):
        begin = sum((1, 3, 6)[:k])
        assert torch.equal(v_cat[:, :, begin : begin + end], q(v_BHSc[:, :, :end]))


# ------------------------------------------------------------------------------------------------ refusals
def _op(**quantizers) -> AttentionOperandQuant:
    specs = {
        "q_quantizer": QuantSpec(4, "uniform", PerToken()), "k_quantizer": QuantSpec(4, "uniform", PerAxes((0, 1, 3))),
        "attn_quantizer": QuantSpec(4, "log2", PerToken()), "v_quantizer": QuantSpec(4, "uniform", PerAxes((0, 1))),
    }
    made = {name: FakeQuantizer(spec) for name, spec in specs.items()}
    made.update(quantizers)
    return AttentionOperandQuant(**made, block_idx=7)


class _OpaqueAV(nn.Module):
    pass


@pytest.mark.parametrize("change, operand", [
    (dict(k_quantizer=FakeQuantizer(QuantSpec(4, "uniform", PerAxes((0, 1, 3)), estimator="percentile"))),
     "k_quantizer"),
    (dict(v_quantizer=FakeQuantizer(QuantSpec(4, "uniform", PerAxes((0, 1)), estimator="mse"))), "v_quantizer"),
    (dict(k_quantizer=FakeQuantizer(QuantSpec(4, "uniform", PerScale(3)))), "k_quantizer"),
    (dict(q_quantizer=FakeQuantizer(QuantSpec(4, "uniform", PerTensor()))), "q_quantizer"),
    (dict(attn_quantizer=FakeQuantizer(QuantSpec(4, "uniform", PerToken()))), "attn_quantizer"),
    (dict(attn_quantizer=FakeQuantizer(QuantSpec(4, "log2", PerGroup(4)))), "attn_quantizer"),
])
def test_unreproducible_quantizers_are_refused_by_name(change, operand):
    check_vectorisable(_op(), ENDS)  # the framework's own operands pass
    with pytest.raises(ValueError, match=rf"block 7: .*{operand}.*attention_pass=cached"):
        check_vectorisable(_op(**change), ENDS)


def test_unknown_av_matmul_single_key_and_grouped_shift_sum_v_are_refused():
    op = _op()
    op.av_matmul = _OpaqueAV()
    with pytest.raises(ValueError, match="block 7: .*av_matmul.*attention_pass=cached"):
        check_vectorisable(op, ENDS)
    op = _op(v_quantizer=FakeQuantizer(QuantSpec(4, "uniform", PerGroup(2))))
    op.av_matmul = ShiftSumAV(0.01)
    with pytest.raises(ValueError, match="block 7: .*v_quantizer.*attention_pass=cached"):
        check_vectorisable(op, ENDS)
    op = _op()
    op.skip_single_key = True
    with pytest.raises(ValueError, match="block 7: .*skip_single_key.*attention_pass=cached"):
        check_vectorisable(op, ENDS)


def test_config_and_adapters_without_the_pass_are_refused():
    with pytest.raises(ValueError, match="attention_pass='fast'; choose one of cached, vectorised"):
        ReconConfig(attention_pass="fast")
    with pytest.raises(ValueError, match="object has only the cached attention pass; set attention_pass=cached"):
        _check_attention_pass(object(), ReconConfig(attention_pass="vectorised"))
    _check_attention_pass(object(), ReconConfig())  # the default asks nothing of the adapter


def test_reconstruct_refuses_before_the_first_unit(calib_set):
    qvar = _quantized("brecq", W6A6)
    op = qvar.blocks[1].attn.operand_quant
    op.k_quantizer = FakeQuantizer(QuantSpec(6, "uniform", PerAxes((0, 1, 3)), estimator="percentile"))
    cfg = ReconConfig(iters=2, attention_pass="vectorised")
    with pytest.raises(ValueError, match="block 1: .*k_quantizer.*percentile.*attention_pass=cached"):
        reconstruct(qvar, copy.deepcopy(tiny_var()), calib_set, cfg, "cpu")
    # nothing was fitted: no weight rounding was switched to AdaRound
    assert not any(isinstance(m, AdaRoundRounding) for m in qvar.modules())


# ------------------------------------------------------------------------------------------------ end to end
def test_reconstruct_with_the_vectorised_pass_gives_the_cached_losses(calib_set):
    cfg = dict(iters=6, batch_size=4, lr=0.05, weight_reg=1.0, warmup=0.2, lr_schedule="constant")
    stats = {}
    for attention_pass in ("cached", "vectorised"):
        qvar = _quantized("ours", W6A6)
        stats[attention_pass] = reconstruct(qvar, copy.deepcopy(tiny_var()), calib_set,
                                            ReconConfig(**cfg, attention_pass=attention_pass), "cpu")
    cached, vectorised = stats["cached"]["units"], stats["vectorised"]["units"]
    assert [u["name"] for u in vectorised] == [u["name"] for u in cached]
    assert any(u["name"].endswith(".attn") for u in cached)
    for uc, uv in zip(cached, vectorised):
        if not uc["name"].endswith(".attn"):  # other units run the same code on the same FP inputs
            assert uv == {**uc, "fit_s": uv["fit_s"], "s_per_iter": uv["s_per_iter"], "score_s": uv["score_s"]}
            continue
        assert uv["loss_rtn"] == pytest.approx(uc["loss_rtn"], rel=1e-5)
        # after training a last-bit difference may have moved a code or a hardened rounding: close, not equal
        assert uv["loss_soft_end"] == pytest.approx(uc["loss_soft_end"], rel=1e-2)
        assert uv["loss_after"] == pytest.approx(uc["loss_after"], rel=1e-2)
    assert stats["vectorised"]["config"]["attention_pass"] == "vectorised"


def test_vectorised_key_changes_the_run_id_only_away_from_its_default():
    from varq.compose import compose_run_config
    from varq.identity import quant_id, run_id

    base = compose_run_config(["quant=ours", "bits=w4a4"])
    same = compose_run_config(["quant=ours", "bits=w4a4", "quant.attention_pass=cached"])
    other = compose_run_config(["quant=ours", "bits=w4a4", "quant.attention_pass=vectorised"])
    assert run_id(same) == run_id(base) and quant_id(same) == quant_id(base)
    assert run_id(other) != run_id(base) and quant_id(other) != quant_id(base)


def test_a_quantized_model_moves_with_module_to():
    # nn.Module.to() walks every submodule's _apply(fn): the operand module must not shadow that name
    qvar = _quantized("ours", W6A6)
    qvar.to(torch.float64)
    op = qvar.blocks[0].attn.operand_quant
    assert op.av_matmul.theta.dtype == torch.float64 and qvar.blocks[0].attn.proj.weight.dtype == torch.float64
