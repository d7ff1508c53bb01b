"""PTQ4ARVG and its SmoothQuant baseline on the tiny VAR: granularity map, STWQ at sampling time, exact folding,
state with folded transforms, config composition."""

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
from varq.quant.primitives import fake_quantize_affine, qparams_minmax
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
        step, zero = qparams_minmax(qkv_q.range_min[si], qkv_q.range_max[si], 6)
        torch.testing.assert_close(out, fake_quantize_affine(x, step, zero, 6), atol=0, rtol=0)
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


def test_released_options_change_what_is_calibrated(models, calib_set):
    var = copy.deepcopy(models[0])
    cfg = PTQ4ARVGConfig(masked_calibration=False, released_sink_split=True)
    qvar = PTQ4ARVG(cfg).calibrate(var, calib_set, W6A6)
    assert _input_granularity(qvar, "head") == PerScale(2)
    masked = PTQ4ARVG(PTQ4ARVGConfig()).calibrate(copy.deepcopy(models[0]), calib_set, W6A6)
    a, b = qvar.blocks[1].attn.mat_qkv.input_quantizer, masked.blocks[1].attn.mat_qkv.input_quantizer
    assert not torch.allclose(a.range_max, b.range_max)


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
    [(["quant=ptq4arvg"], "dgc"), (["quant=ptq4arvg", "calib=random"], "random"), (["quant=smoothquant"], "random")],
)
def test_ptq4arvg_defaults_to_dgc_calibration(run_config, overrides, calib):
    cfg = run_config("model=var_tiny", *overrides)
    assert cfg.calib.name == calib and cfg.calib_label == calib
