"""quant=brecq and the reusable AdaRound reconstruction engine (varq.quant.recon) on the tiny VAR."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from varq.config import BitsConfig
from varq.quant.granularity import layout_for, to_view
from varq.quant.methods.brecq import Brecq, BrecqConfig, framework_policy
from varq.quant.model import quant_linears, quantize_var
from varq.quant.qmodules import QuantLinear
from varq.quant.recon import ReconConfig
from varq.quant.recon.adaround import Unit, fit_unit
from varq.quant.replay import forward_kv_cached
from varq.quant.rounding import AdaRoundRounding

W3A8 = BitsConfig("w3a8", 3, 8)  # 3-bit weights: rounding matters more than activation noise on the tiny model
W4A4 = BitsConfig("w4a4", 4, 4)
# strong enough to decide most roundings in a few dozen steps (the paper values need thousands)
FAST = dict(iters=40, batch_size=8, lr=0.05, weight_reg=1.0, warmup=0.2, lr_schedule="constant")


@pytest.fixture(scope="module")
def reconstructed(models, calib_set):
    method = Brecq(BrecqConfig(**FAST))
    return method, method.calibrate(copy.deepcopy(models[0]), calib_set, W3A8)


def _calib_logits(var, calib_set):
    label_N, x_NLC = calib_set.teacher_batch(slice(None), with_uncond=True)
    with torch.no_grad():
        return forward_kv_cached(var, label_N, x_NLC)


def test_stages_chain_to_the_models_logits(models, calib_set):
    # The engine's stage-by-stage streams must be the model: FP stages give the teacher-forced logits, quantized
    # stages with the KV-cached attention replay give exactly what the sampler path computes.
    from varq.models.lookup import adapter_for
    from varq.quant.recon import units as U

    fp, vqvae = models
    qvar = quantize_var(copy.deepcopy(fp), framework_policy(BrecqConfig()), W4A4)
    label_N, x_NLC = calib_set.teacher_batch(slice(None), with_uncond=True)
    for var, expected in ((fp, fp(label_N, x_NLC)), (qvar, _calib_logits(qvar, calib_set))):
        adapter = adapter_for(var)
        stream = adapter.init_stream(label_N)
        for stage in adapter.stages():
            x = adapter.stage_input(stage, stream, x_NLC)
            out = U.fp_stage_output(var, stage, x) if var is fp else U.map_rows(
                lambda rows, stage=stage, adapter=adapter: adapter.run_stage(stage, rows), x)
            adapter.advance(stage, stream, out)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_every_unit_beats_round_to_nearest(reconstructed, models, calib_set):
    method, qvar = reconstructed
    units = method.stats["units"]
    assert [u["name"] for u in units] == [
        "word_embed", "blocks.0.ada_lin", "blocks.0.attn", "blocks.0.ffn",
        "blocks.1.ada_lin", "blocks.1.attn", "blocks.1.ffn", "head_nm.ada_lin", "head",
    ]
    for u in units:
        assert u["loss_after"] < 0.9 * u["loss_rtn"], u
    assert method.stats["rows"] == 2 * len(calib_set)  # cond + uncond row per sequence
    report = method.report(qvar)
    assert report["recon_units"] == 9 and report["recon_loss"] < report["recon_loss_rtn"]
    # the time splits into capture, scoring (the two losses above) and fitting, and nothing is counted twice
    stats = method.stats
    assert all(u["score_s"] > 0 for u in units) and stats["score_s"] == pytest.approx(sum(u["score_s"] for u in units))
    assert stats["capture_s"] > 0
    assert stats["capture_s"] + stats["score_s"] + stats["fit_s"] == pytest.approx(stats["total_s"])
    assert report["recon_score_s"] == stats["score_s"]

    # end to end, independent of the engine's bookkeeping: the sampled (KV-cached) logits move closer to FP
    rtn = quantize_var(copy.deepcopy(models[0]), framework_policy(BrecqConfig()), W3A8)
    fp = _calib_logits(models[0], calib_set)
    err = {name: (_calib_logits(v, calib_set) - fp).norm().item() for name, v in (("rtn", rtn), ("brecq", qvar))}
    assert err["brecq"] < 0.9 * err["rtn"], err


def _on_grid(code, zero, qmax):
    return torch.clamp(code + zero, 0, qmax) - zero  # what the quantizer's clamp makes of an integer choice


def test_hardened_weights_are_floor_or_ceil(reconstructed, models):
    _, qvar = reconstructed
    changed = total = 0
    for fqn, qlinear in quant_linears(qvar).items():
        wq = qlinear.weight_quantizer
        assert isinstance(wq.rounding, AdaRoundRounding) and bool(wq.rounding.hard), fqn
        w_fp = models[0].get_submodule(fqn).weight.detach()
        layout = layout_for(wq.spec.granularity, w_fp.shape)
        scale, zero = wq.qparams()
        qmax = 2**wq.spec.bits - 1
        with torch.no_grad():
            w_scaled = to_view(w_fp, layout) / scale
            code = torch.round(to_view(wq(qlinear.weight), layout) / scale)  # integer grid point chosen
        floor, ceil, nearest = (_on_grid(c, zero, qmax) for c in (w_scaled.floor(), w_scaled.ceil(), w_scaled.round()))
        assert bool(((code == floor) | (code == ceil)).all()), fqn
        changed += int((code != nearest).sum())
        total += code.numel()
    assert 0 < changed < total // 2  # AdaRound moved some roundings away from nearest, not most of them


def test_quantizer_state_round_trip_is_exact(reconstructed, models, calib_set, tmp_path):
    method, qvar = reconstructed
    torch.save(method.quantizer_state(qvar), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert any(k.endswith("rounding.alpha") for k in state)
    fresh = Brecq(BrecqConfig(**FAST)).load_quantizer_state(copy.deepcopy(models[0]), state, W3A8)
    torch.testing.assert_close(_calib_logits(fresh, calib_set), _calib_logits(qvar, calib_set), atol=0, rtol=0)


def test_deterministic_with_a_fixed_seed(models, calib_set):
    def run(seed):
        cfg = BrecqConfig(**{**FAST, "iters": 6, "seed": seed})
        return _calib_logits(Brecq(cfg).calibrate(copy.deepcopy(models[0]), calib_set, W4A4), calib_set)

    a, b = run(0), run(0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, run(1))  # the seed really drives the row sampling


@pytest.mark.parametrize("inputs", ["fp", "quant"])
def test_layer_units_and_quantized_inputs(models, calib_set, inputs):
    method = Brecq(BrecqConfig(**{**FAST, "iters": 15, "units": "layer", "recon_inputs": inputs}))
    method.calibrate(copy.deepcopy(models[0]), calib_set, W3A8)
    units = method.stats["units"]
    assert len(units) == 1 + 2 * 5 + 2  # every Linear its own unit
    assert sum(u["loss_after"] for u in units) < sum(u["loss_rtn"] for u in units)


def test_regulariser_decides_every_rounding():
    # one Linear alone, long enough for β to anneal and the rounding regulariser to win
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    for p in linear.parameters():
        p.requires_grad_(False)
    from varq.quant.factories import static_weight_quantizer, weight_spec

    qlinear = QuantLinear(linear, static_weight_quantizer(linear, weight_spec(3, 32)))
    x_N = torch.randn(64, 32)
    unit = Unit("lin", {"lin": qlinear}, qlinear, None)
    cfg = ReconConfig(iters=400, batch_size=16, lr=0.05, weight_reg=0.1)
    stats = fit_unit(unit, x_N, linear(x_N), cfg, torch.Generator().manual_seed(0))
    assert stats.reg_end < 1e-3
    assert stats.loss_after < stats.loss_rtn
    # hardened = soft at the end, since every h(α) sits at 0 or 1
    assert abs(stats.loss_after - stats.loss_soft_end) < 0.5 * stats.loss_after + 1e-6


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="units"):
        ReconConfig(units="blocks")
    with pytest.raises(ValueError, match="inputs"):
        BrecqConfig(recon_inputs="teacher")


DIGITS_ASSET = Path(__file__).resolve().parents[2] / "varq" / "assets" / "digits_var.safetensors"


@pytest.mark.skipif(not DIGITS_ASSET.is_file(), reason="var_digits assets not built (make assets)")
def test_digits_brecq_beats_rtn_at_w4a4(run_config):
    check_digits_brecq_beats_rtn(run_config, source="asset")


def check_digits_brecq_beats_rtn(run_config, source: str) -> dict:
    """BRECQ's own recipe (lr 1e-3, λ 0.01, 20% warm-up; 200 iterations) against RTN on var_digits at W4A4."""
    from varq.calib.random import build as build_random
    from varq.models.factory import build_models

    cfg = run_config(
        "model=var_digits", f"model.source={source}", "quant=brecq", "bits=w4a4", "calib.n_images=16",
        "quant.iters=200", "quant.lr=1e-3", "quant.weight_reg=0.01", "quant.warmup=0.2", "quant.lr_schedule=constant",
    )
    var, vqvae = build_models(cfg.model, "cpu")
    calib_set = build_random(cfg, var, vqvae, torch.device("cpu"))
    method = Brecq(cfg.quant)
    qvar = method.calibrate(copy.deepcopy(var), calib_set, cfg.bits)
    blocks = [u for u in method.stats["units"] if u["name"].endswith((".attn", ".ffn"))]
    assert len(blocks) == 2 * len(var.blocks)
    assert sum(u["loss_after"] for u in blocks) < sum(u["loss_rtn"] for u in blocks)
    rtn = quantize_var(copy.deepcopy(var), framework_policy(cfg.quant), cfg.bits)
    fp = _calib_logits(var, calib_set)
    err = {name: (_calib_logits(v, calib_set) - fp).norm().item() for name, v in (("rtn", rtn), ("brecq", qvar))}
    assert err["brecq"] < err["rtn"], err
    return {"units": method.stats["units"], "logit_err": err}
