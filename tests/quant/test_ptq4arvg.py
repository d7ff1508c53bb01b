"""PTQ4ARVG and its SmoothQuant baseline on the tiny VAR: granularity map, STWQ at sampling time, exact folding,
state with folded transforms, the released statistics (unmasked pass, quantizers upstream switched on, EMA of step
and fractional zero point, EMA of per-batch SmoothQuant scales), config composition."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import PATCH_NUMS, random_teacher_batch, tiny_var, tiny_vqvae
from varq.calib import CalibSet
from varq.config import BitsConfig
from varq.quant import FakeQuantizer, PerChannel, PerScale, PerTensor, QuantLinear
from varq.quant.methods.ptq4arvg import PTQ4ARVG, PTQ4ARVGConfig
from varq.quant.methods.smoothquant import SmoothQuant, SmoothQuantConfig
from varq.quant.model import attention_quants, quant_enabled
from varq.sample.sampler import generate

W6A6 = BitsConfig("w6a6", 6, 6)


@pytest.fixture(scope="module")
def models():
    return tiny_var(), tiny_vqvae()


@pytest.fixture(scope="module")
def calib_set(models):
    label_N, x_NLC, idx = random_teacher_batch(models[1], B=8, seed=5)
    return CalibSet(labels_N=label_N, seeds_N=torch.zeros(8, dtype=torch.long), idx_per_scale=idx,
                    teacher_input_NLC=x_NLC, num_classes=10, cfg=1.5)


@pytest.fixture(scope="module")
def calibrated(models, calib_set):
    method = PTQ4ARVG(PTQ4ARVGConfig())
    return method, method.calibrate(copy.deepcopy(models[0]), calib_set, W6A6)


def _input_granularity(var, fqn):
    return var.get_submodule(fqn).input_quantizer.spec.granularity


def test_granularity_map(calibrated):
    _, qvar = calibrated
    assert type(qvar.word_embed) is torch.nn.Linear  # kept FP
    for i in range(2):
        for name in ("attn.mat_qkv", "ffn.fc1"):
            assert _input_granularity(qvar, f"blocks.{i}.{name}") == PerScale(len(PATCH_NUMS))
        for name in ("attn.proj", "ffn.fc2"):
            assert _input_granularity(qvar, f"blocks.{i}.{name}") == PerScale(2)
        assert _input_granularity(qvar, f"blocks.{i}.ada_lin.1") == PerTensor()
    assert _input_granularity(qvar, "head") == PerTensor()
    for m in qvar.modules():
        if isinstance(m, QuantLinear):
            spec = m.weight_quantizer.spec
            assert spec.granularity == PerChannel(0) and spec.estimator == "percentile" and spec.bits == 6
            assert m.input_quantizer.is_frozen and m.input_quantizer.spec.estimator == "percentile"
    for op in attention_quants(qvar).values():
        for q in op.operand_quantizers().values():
            assert q.spec.granularity == PerTensor() and not q.spec.dynamic and q.is_frozen


def test_stwq_picks_the_range_of_the_sampled_scale_sink_included(calibrated, models):
    _, qvar = calibrated
    qkv_q = qvar.blocks[1].attn.mat_qkv.input_quantizer
    fc2_q = qvar.blocks[0].ffn.fc2.input_quantizer
    assert len(set(zip(qkv_q.range_min.tolist(), qkv_q.range_max.tolist()))) == len(PATCH_NUMS)  # distinct sets
    seen = {"qkv": [], "fc2": []}
    handles = [
        qkv_q.register_forward_hook(lambda m, args, out: seen["qkv"].append((args[0], args[1], out))),
        fc2_q.register_forward_hook(lambda m, args, out: seen["fc2"].append((args[0].shape[1], args[1]))),
    ]
    with torch.no_grad():
        generate(qvar, models[1], torch.tensor([2, 5]), cfg=1.5, top_k=8, top_p=0.9,
                 rng=torch.Generator().manual_seed(0))
    for h in handles:
        h.remove()
    assert len(seen["qkv"]) == len(PATCH_NUMS)  # one KV-cached step per scale
    for si, (x, scale_idx_L, out) in enumerate(seen["qkv"]):
        assert x.shape[1] == PATCH_NUMS[si] ** 2 and scale_idx_L.tolist() == [si] * x.shape[1]
        # released quantizer: fractional zero point z = −lo/Δ, Q(x) = Δ·(clamp(round(x/Δ) + z, 0, 63) − z)
        lo, hi = qkv_q.range_min[si], qkv_q.range_max[si]
        step = (hi - lo) / 63
        zero = -lo / step
        expect = (torch.clamp(torch.round(x / step) + zero, 0, 63) - zero) * step
        torch.testing.assert_close(out, expect, atol=1e-6, rtol=0)
    # proj/fc2: the sink (first step, one token) has its own range, every later token shares the other
    assert [(n, idx.unique().tolist()) for n, idx in seen["fc2"]] == [(1, [0]), (4, [1]), (16, [1])]


def test_calibrated_model_with_quantizers_off_is_the_fp_model(calibrated, models):
    # every fold (SmoothQuant, shift, GPS) is exact: with fake quantization off the outputs are the FP ones
    _, qvar = calibrated
    label_B, x_BLC, _ = random_teacher_batch(models[1], seed=9)
    with torch.no_grad(), quant_enabled(qvar, weights=False, activations=False):
        out = qvar(label_B, x_BLC)
    with torch.no_grad():
        ref = models[0](label_B, x_BLC)
        quant = qvar(label_B, x_BLC)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(quant, ref, atol=1e-3)
    assert not torch.equal(qvar.head.weight, models[0].head.weight)  # the weights really were transformed


def test_state_carries_the_folded_transforms(calibrated, models):
    method, qvar = calibrated
    state = method.quantizer_state(qvar)
    stages = sorted({k.split(".")[1] for k in state if k.startswith("transforms.")})
    assert stages == ["0", "1", "2"]  # SmoothQuant, shift, GPS
    assert "transforms.1.blocks.0.attn.mat_qkv.shift_C" in state and "transforms.2.head.scale_C" in state
    fresh = PTQ4ARVG(PTQ4ARVGConfig()).load_quantizer_state(copy.deepcopy(models[0]), state, W6A6)
    for name, p in qvar.named_parameters():
        assert torch.equal(p, fresh.get_parameter(name)), name
    assert torch.equal(fresh.blocks[0].attn.zero_k_bias, qvar.blocks[0].attn.zero_k_bias)


def test_masked_calibration_option_changes_what_is_calibrated(models, calib_set):
    unmasked = PTQ4ARVG(PTQ4ARVGConfig()).calibrate(copy.deepcopy(models[0]), calib_set, W6A6)
    explicit = PTQ4ARVG(PTQ4ARVGConfig(masked_calibration=False)).calibrate(copy.deepcopy(models[0]), calib_set, W6A6)
    masked = PTQ4ARVG(PTQ4ARVGConfig(masked_calibration=True)).calibrate(copy.deepcopy(models[0]), calib_set, W6A6)
    a, b, c = (m.blocks[1].attn.mat_qkv.input_quantizer for m in (unmasked, explicit, masked))
    assert torch.equal(a.range_max, b.range_max)  # the default is the released unmasked pass
    assert not torch.allclose(a.range_max, c.range_max)
    assert _input_granularity(unmasked, "head") == PerTensor()  # the release never sink-splits the head


def _unmasked_inputs(var, calib_batch, fqn):
    from varq.quant.calib_pass import teacher_forward

    seen = []
    h = var.get_submodule(fqn).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        teacher_forward(var, calib_batch, masked=False)
    h.remove()
    return seen[0]


def test_smoothquant_scales_are_an_ema_of_per_batch_scales_on_the_unmasked_pass(models, calib_set):
    # two calibration batches (4 label pairs each): s = 0.9·s_1 + 0.1·s_2, s_b = √(max|X_b| / max|W|) per channel,
    # X_b the FP unmasked inputs (mat_qkv without the sink token, head with it)
    from varq.quant.calib_pass import calib_batches

    method = PTQ4ARVG(PTQ4ARVGConfig(batch_size=8))
    state = method.quantizer_state(method.calibrate(copy.deepcopy(models[0]), calib_set, W6A6))
    batches = calib_batches(calib_set, 8, "cpu")
    assert len(batches) == 2
    for fqn, skip in (("head", 0), ("blocks.1.attn.mat_qkv", 1)):
        w_absmax_C = models[0].get_submodule(fqn).weight.abs().amax(dim=0)
        per_batch = []
        for batch in batches:
            x = _unmasked_inputs(models[0], batch, fqn)[:, skip:]
            per_batch.append((x.abs().amax(dim=(0, 1)) / w_absmax_C).sqrt())
        torch.testing.assert_close(state[f"transforms.0.{fqn}.scale_C"], 0.9 * per_batch[0] + 0.1 * per_batch[1],
                                   rtol=1e-5, atol=1e-6)


def _released_percentile_qparams(x, bits):
    # the release's search, written out: candidates q ∈ {0.999, 0.9999, 0.99999}, keep the smallest squared error
    flat = x.flatten().double()
    levels = 2**bits - 1
    best = None
    for q in (0.999, 0.9999, 0.99999):
        hi, lo = torch.quantile(flat, q), torch.quantile(flat, 1 - q)
        step = (hi - lo) / levels
        zero = torch.round(-lo / step)
        err = ((torch.clamp(torch.round(flat / step) + zero, 0, levels) - zero) * step - flat).pow(2).sum()
        if best is None or err < best[0]:
            best = (err, step, zero)
    return best[1], best[2]


def test_quantizers_observe_with_everything_upstream_quantized(models, calib_set):
    # one calibration batch: each activation quantizer's (Δ, z) is the percentile search of the inputs it sees in the
    # quantized model (upstream weights and activations quantized), not of the FP inputs
    from varq.quant.calib_pass import calib_batches

    qvar = PTQ4ARVG(PTQ4ARVGConfig(batch_size=16)).calibrate(copy.deepcopy(models[0]), calib_set, W6A6)
    (batch,) = calib_batches(calib_set, 16, "cpu")
    for fqn in ("blocks.1.ffn.fc2", "blocks.1.ada_lin.1", "head"):
        q = qvar.get_submodule(fqn).input_quantizer
        x = _unmasked_inputs(qvar, batch, fqn)
        x = x[:, 1:] if isinstance(q.spec.granularity, PerScale) else x  # fc2: the rest-of-tokens range
        step, zero = _released_percentile_qparams(x, 6)
        lo, hi = q.range_min.reshape(-1)[-1], q.range_max.reshape(-1)[-1]
        torch.testing.assert_close((hi - lo).double() / 63, step, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(-lo.double() / step, zero, rtol=0, atol=1e-3)
        fp_x = _unmasked_inputs(models[0], batch, fqn) if fqn == "blocks.1.ada_lin.1" else None
        if fp_x is not None:  # the AdaLN input (SiLU of the class embedding) is the same in both models
            torch.testing.assert_close(fp_x, x)


def test_activation_zero_points_are_an_ema_and_fractional(models, calib_set):
    # two batches: Δ = 0.9·Δ_1 + 0.1·Δ_2 and z = 0.9·z_1 + 0.1·z_2 with integer z_b, so z is fractional in general
    from varq.quant.quantizer import FakeQuantizer as FQ
    from varq.quant.quantizer import QuantSpec

    spec = PTQ4ARVG(PTQ4ARVGConfig()).recipe().static_spec(6, PerTensor())
    q = FQ(spec)
    x1, x2 = torch.linspace(-1.0, 3.0, 5000), torch.linspace(-2.5, 1.0, 5000)
    q.observe(x1)
    q.observe(x2)
    q.freeze()
    (s1, z1), (s2, z2) = _released_percentile_qparams(x1, 6), _released_percentile_qparams(x2, 6)
    step, zero = 0.9 * s1 + 0.1 * s2, 0.9 * z1 + 0.1 * z2
    assert abs(zero - torch.round(zero)) > 0.05  # the case that matters: a fractional zero point
    x = torch.linspace(-4, 4, 301)
    expect = (torch.clamp(torch.round(x.double() / step) + zero, 0, 63) - zero) * step
    torch.testing.assert_close(q(x).double(), expect, atol=1e-5, rtol=0)
    assert not spec.ema_qparams or QuantSpec(6, "uniform", PerTensor(), dynamic=False).ema_qparams is False


def test_smoothquant_baseline_is_per_tensor_only(models, calib_set):
    method = SmoothQuant(SmoothQuantConfig())
    qvar = method.calibrate(copy.deepcopy(models[0]), calib_set, W6A6)
    for m in qvar.modules():
        if isinstance(m, QuantLinear):
            assert m.input_quantizer.spec.granularity == PerTensor()
    state = method.quantizer_state(qvar)
    assert {k.split(".")[1] for k in state if k.startswith("transforms.")} == {"0"}
    assert not any(k.endswith("shift_C") for k in state)
    label_B, x_BLC, _ = random_teacher_batch(models[1], seed=9)
    with torch.no_grad(), quant_enabled(qvar, weights=False, activations=False):
        torch.testing.assert_close(qvar(label_B, x_BLC), models[0](label_B, x_BLC), atol=2e-5, rtol=1e-5)


def test_static_quantizers_never_see_calibration_again(calibrated):
    _, qvar = calibrated
    assert all(q.is_frozen for q in qvar.modules() if isinstance(q, FakeQuantizer))


@pytest.mark.parametrize(
    "overrides,calib",
    [(["quant=ptq4arvg"], "dgc"), (["quant=ptq4arvg", "calib=random"], "random"), (["quant=smoothquant"], "dgc")],
)
def test_ptq4arvg_and_smoothquant_default_to_dgc_calibration(run_config, overrides, calib):
    from varq.compose import calib_label

    cfg = run_config("model=var_tiny", *overrides)
    assert cfg.calib.name == calib and calib_label(cfg) == calib


@pytest.mark.parametrize("quant", ["ptq4arvg", "smoothquant"])
def test_presets_reproduce_the_released_calibration(run_config, quant):
    cfg = run_config("model=var_tiny", f"quant={quant}")
    c = cfg.calib
    assert (c.n_images, c.batch_size, c.seed) == (128, 32, 42)  # 128 fp32 generations in batches of 32, seed 42
    assert (c.dgc.selection, c.dgc.top_p, c.dgc.dtype, c.dgc.feature) == ("ratio", 0.95, "fp32", "sink")
    q = cfg.quant
    assert (q.batch_size, q.masked_calibration, q.statistics) == (64, False, "released")  # 2 batches, unmasked
    defaults = (PTQ4ARVGConfig if quant == "ptq4arvg" else SmoothQuantConfig)()
    assert (defaults.masked_calibration, defaults.statistics) == (False, "released")


def test_unknown_statistics_mode_is_refused():
    with pytest.raises(ValueError, match="quant.statistics"):
        PTQ4ARVGConfig(statistics="ema")
