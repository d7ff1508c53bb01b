"""The method layer: the base classes' contract, the one framework policy, renamed keys, folded transforms kept on
the method, ours_litevar composed from ours, and a method added with one .py and one .yaml."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_cfg
from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
from varq.calib import CalibSet
from varq.config import BitsConfig
from varq.quant.factories import (
    attention_operand_specs,
    dynamic_quantizer,
    static_weight_quantizer,
    token_spec,
    weight_spec,
)
from varq.quant.granularity import PerAxes, PerToken
from varq.quant.methods._framework import framework_policy
from varq.quant.methods.base import Method, PolicyMethod, install_adaround_for
from varq.quant.methods.brecq import Brecq, BrecqConfig
from varq.quant.methods.fp16 import FP16, FP16Config
from varq.quant.methods.litevar import LiteVARConfig
from varq.quant.methods.ours import OursConfig, OursLiteVARConfig
from varq.quant.methods.ptq4arvg import PTQ4ARVG, PTQ4ARVGConfig
from varq.quant.methods.rtn import RTN, RTNConfig
from varq.quant.methods.smoothquant import SmoothQuantConfig
from varq.quant.model import QuantPolicy, quantize_var, quantizer_state_dict
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.registry import MethodConfig, available_methods, get_method, method_config_class
from varq.quant.rounding import AdaRoundRounding

ROOT = Path(__file__).resolve().parents[1]
BITS = [BitsConfig(f"w{w}a{a}", w, a) for w, a in ((4, 4), (6, 6), (8, 8), (4, 8), (8, 4))]


@pytest.fixture(scope="module")
def fp_var():
    return tiny_var()


@pytest.fixture(scope="module")
def calib_set():
    var, vqvae = tiny_var(), tiny_vqvae()
    label_N, x_NLC, idx = random_teacher_batch(vqvae, B=8, seed=5)
    return CalibSet(labels_N=label_N, seeds_N=torch.zeros(8, dtype=torch.long), idx_per_scale=idx,
                    teacher_input_NLC=x_NLC, num_classes=var.num_classes, cfg=1.5)


# ------------------------------------------------------------------ base classes
class _Forgetful(Method):
    """A method that quantizes but forgets to say how to save and restore it."""

    def calibrate(self, var, calib_set, bits):
        return var


def test_the_plain_base_refuses_to_save_or_restore_instead_of_returning_the_fp_model(fp_var):
    method = _Forgetful(MethodConfig(name="forgetful"))
    method.name = "forgetful"
    with pytest.raises(NotImplementedError, match="forgetful"):
        method.quantizer_state(fp_var)
    with pytest.raises(NotImplementedError, match="forgetful"):
        method.load_quantizer_state(copy.deepcopy(fp_var), {}, BITS[0])
    assert method.report() == {}


def test_fp16_has_no_state(fp_var):
    method = FP16(FP16Config())
    assert method.quantizer_state(fp_var) == {}
    assert method.load_quantizer_state(fp_var, {}, BITS[0]) is fp_var


def test_a_policy_method_must_define_its_policy():
    class NoPolicy(PolicyMethod):
        pass

    with pytest.raises(TypeError, match="policy"):
        NoPolicy(MethodConfig())


def test_adaround_is_installed_only_where_the_state_holds_alpha(fp_var):
    qvar = RTN(RTNConfig()).calibrate(copy.deepcopy(fp_var), None, BITS[0])
    state = quantizer_state_dict(qvar)
    alpha = torch.zeros_like(qvar.head.weight)
    state["head.weight_quantizer.rounding.alpha"] = alpha
    install_adaround_for(qvar, state)
    roundings = {fqn: type(m.weight_quantizer.rounding) for fqn, m in qvar.named_modules() if isinstance(m, QuantLinear)}
    assert roundings.pop("head") is AdaRoundRounding
    assert roundings and AdaRoundRounding not in roundings.values()


def test_a_policy_state_with_adaround_restores_it(fp_var):
    # round to nearest, except head, whose AdaRound α pushes every weight to the level above floor(w/Δ)
    method = RTN(RTNConfig())
    qvar = method.calibrate(copy.deepcopy(fp_var), None, BITS[0])
    quantizer = qvar.head.weight_quantizer
    quantizer.rounding = AdaRoundRounding()
    quantizer.rounding.alpha = torch.nn.Parameter(torch.full_like(qvar.head.weight, 5.0))
    quantizer.rounding.harden()
    quantizer.invalidate_cache()
    fresh = method.load_quantizer_state(copy.deepcopy(fp_var), method.quantizer_state(qvar), BITS[0])
    w = fp_var.head.weight
    assert torch.equal(fresh.head.weight_quantizer(w), quantizer(w))
    assert not torch.equal(fresh.head.weight_quantizer(w), RTN(RTNConfig()).calibrate(
        copy.deepcopy(fp_var), None, BITS[0]).head.weight_quantizer(w))  # the rounding really differs from nearest


# ------------------------------------------------------------------ one framework policy
def _released(spec: QuantSpec, clamp: bool, min_step: float) -> QuantSpec:
    return dataclasses.replace(spec, clamp_zero_point=clamp, min_step=min_step)


def _brecq_policy_as_written_before(c: dict) -> QuantPolicy:
    """BRECQ's quantizers as its own policy built them: groups wherever in_features % weight_group_size == 0."""
    G, low = c["weight_group_size"], c["group_below_bits"]

    def linear_quantizers(site, linear, bits):
        groupable = G > 0 and linear.in_features % G == 0
        w_group = G if bits.w_bits < low and groupable else 0
        w_spec = _released(weight_spec(bits.w_bits, linear.in_features, w_group), c["clamp"], c["min_step"])
        a_group = c["act_group_size"] if bits.a_bits < low and groupable else 0
        kind = "sign_split" if site.fqn.endswith("ffn.fc2") else "uniform"
        return (static_weight_quantizer(linear, w_spec),
                dynamic_quantizer(token_spec(bits.a_bits, linear.in_features, a_group, kind=kind)))

    def attention_quantizers(block_idx, bits):
        specs = attention_operand_specs(bits.a_bits, softmax_kind="log2")
        if bits.a_bits < low:
            specs["k_quantizer"] = QuantSpec(bits.a_bits, "uniform", PerToken())
        return {name: dynamic_quantizer(spec) for name, spec in specs.items()}

    return QuantPolicy(linear_quantizers, attention_quantizers, exclude=tuple(c["exclude"]))


def _ours_policy_as_written_before(c: dict) -> QuantPolicy:
    """Shift-and-Sum's quantizers as its own policy built them: groups where in_features % group_if_divisible_by
    == 0, attention specs spelled out."""

    def group(bits, features, size):
        return size if bits < c["group_below_bits"] and features % c["group_if_divisible_by"] == 0 else 0

    def linear_quantizers(site, linear, bits):
        w_group = group(bits.w_bits, linear.in_features, c["weight_group_size"])
        w_spec = _released(weight_spec(bits.w_bits, linear.in_features, w_group), c["clamp"], c["min_step"])
        a_group = group(bits.a_bits, linear.in_features, c["act_group_size"])
        kind = "sign_split" if site.fqn.endswith("ffn.fc2") else "uniform"
        return (static_weight_quantizer(linear, w_spec),
                dynamic_quantizer(token_spec(bits.a_bits, linear.in_features, a_group, kind=kind)))

    def attention_quantizers(block_idx, bits):
        b = bits.a_bits
        k = PerToken() if b < c["group_below_bits"] else PerAxes((0, 1, 3))
        return {
            "q_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerToken())),
            "k_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", k)),
            "attn_quantizer": dynamic_quantizer(QuantSpec(b, "log2", PerToken())),
            "v_quantizer": dynamic_quantizer(QuantSpec(b, "uniform", PerAxes((0, 1)))),
        }

    return QuantPolicy(linear_quantizers, attention_quantizers, exclude=tuple(c["exclude"]))


LAYOUTS = [
    {},
    {"group_below_bits": 7},  # W6/A6 grouped too
    {"group_below_bits": 9},
    {"weight_group_size": 32, "act_group_size": 16},  # the tiny model's 64/256 inputs group; 128 only fc2
    {"weight_group_size": 0},
    {"weight_group_size": 16, "act_group_size": 8, "group_if_divisible_by": 32},
    {"weight_zero_point_clamp": False, "weight_min_step": 1e-3},
    {"exclude": ["blocks.*.ffn.fc2", "head"]},
]


def _expected_keys(config) -> dict:
    return {"weight_group_size": config.weight_group_size, "act_group_size": config.act_group_size,
            "group_below_bits": config.group_below_bits, "group_if_divisible_by": config.group_if_divisible_by,
            "clamp": config.weight_zero_point_clamp, "min_step": config.weight_min_step, "exclude": config.exclude}


def _quantizers(var) -> dict[str, FakeQuantizer]:
    return {fqn: m for fqn, m in var.named_modules() if isinstance(m, FakeQuantizer)}


@pytest.mark.parametrize("bits", BITS, ids=lambda b: b.name)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("method", ["brecq", "ours"])
def test_the_shared_framework_policy_builds_what_each_method_built(method, layout, bits, fp_var):
    if method == "brecq":
        config = BrecqConfig(**{k: v for k, v in layout.items() if k != "group_if_divisible_by"})
        expected_policy = _brecq_policy_as_written_before(_expected_keys(config))
    else:
        config = OursConfig(**layout)
        expected_policy = _ours_policy_as_written_before(_expected_keys(config))
    got = quantize_var(copy.deepcopy(fp_var), framework_policy(config), bits)
    expected = quantize_var(copy.deepcopy(fp_var), expected_policy, bits)
    got_q, expected_q = _quantizers(got), _quantizers(expected)
    assert got_q.keys() == expected_q.keys() and got_q
    for fqn, q in got_q.items():
        assert q.spec == expected_q[fqn].spec, fqn
        assert type(q.rounding) is type(expected_q[fqn].rounding), fqn
    got_state, expected_state = quantizer_state_dict(got), quantizer_state_dict(expected)
    assert got_state.keys() == expected_state.keys()
    for key, value in got_state.items():
        assert torch.equal(value, expected_state[key]), key


def test_the_layouts_above_really_differ(fp_var):
    """The comparison above covers grouped and ungrouped, per-key and per-channel K, clamped and not."""
    def layout_specs(config):
        out = []
        for bits in BITS:
            var = quantize_var(copy.deepcopy(fp_var), framework_policy(config), bits)
            out += sorted((bits.name, fqn, repr(q.spec)) for fqn, q in _quantizers(var).items())
        return tuple(out)

    assert len({layout_specs(OursConfig(**layout)) for layout in LAYOUTS}) == len(LAYOUTS)
    # brecq groups by the weight group size, ours by 128: they differ where those differ
    assert layout_specs(BrecqConfig(**LAYOUTS[3])) != layout_specs(OursConfig(**LAYOUTS[3]))


# ------------------------------------------------------------------ renamed keys
RENAMED = [
    (PTQ4ARVGConfig, "keep_fp", "exclude", ["head"]),
    (SmoothQuantConfig, "keep_fp", "exclude", []),
    (LiteVARConfig, "keep_fp", "exclude", ["head"]),
    (BrecqConfig, "low_bits_below", "group_below_bits", 5),
    (BrecqConfig, "inputs", "recon_inputs", "quant"),
]


@pytest.mark.parametrize(("cls", "old", "new", "value"), RENAMED, ids=lambda x: getattr(x, "__name__", str(x)))
def test_an_old_key_gives_the_same_config_and_a_warning_naming_the_new_one(cls, old, new, value, caplog):
    with caplog.at_level(logging.WARNING, logger="varq.quant.registry"):
        upgraded = cls.from_options({old: value})
    assert upgraded == cls.from_options({new: value}) == cls(**{new: value})
    assert getattr(upgraded, new) == value and getattr(upgraded, new) != getattr(cls(), new)
    assert f"quant.{old}" in caplog.text and f"quant.{new}" in caplog.text
    assert old not in {f.name for f in dataclasses.fields(cls)}  # one key name in every config
    caplog.clear()
    assert cls.from_options({old: None}) == cls() and not caplog.text  # null: unset


def test_an_old_key_on_the_command_line_gives_the_same_method_config():
    def typed(overrides):
        node = OmegaConf.to_container(compose_cfg(["quant=ptq4arvg", *overrides]).quant)
        return method_config_class(node["name"]).from_options(node)

    old = typed(["+quant.keep_fp=[head]"])
    assert old == typed(["quant.exclude=[head]"]) and old.exclude == ["head"]
    assert typed([]).exclude == ["embed"]


def test_the_framework_methods_share_their_key_names():
    shared = {"exclude", "group_below_bits", "weight_group_size", "act_group_size", "group_if_divisible_by",
              "recon_inputs", "weight_zero_point_clamp", "weight_min_step"}
    for cls in (BrecqConfig, OursConfig):
        assert shared <= {f.name for f in dataclasses.fields(cls)}
    for name in ("rtn", "litevar", "ptq4arvg", "smoothquant", "brecq", "ours", "ours_litevar"):
        assert "exclude" in {f.name for f in dataclasses.fields(method_config_class(name))}, name


# ------------------------------------------------------------------ folded transforms on the method
def _old_layout_state(qvar, stages) -> dict[str, torch.Tensor]:
    """A saved PTQ4ARVG state as written before: quantizers, then transforms.<i>.<fqn>.{scale_C,shift_C}."""
    state = dict(quantizer_state_dict(qvar))
    for i, stage in enumerate(stages):
        for fqn, (s_C, delta_C) in stage.items():
            state[f"transforms.{i}.{fqn}.scale_C"] = s_C.clone()
            if delta_C is not None:
                state[f"transforms.{i}.{fqn}.shift_C"] = delta_C.clone()
    return state


def test_folded_transforms_live_on_the_method_and_old_states_load_bit_for_bit(fp_var, calib_set):
    method = PTQ4ARVG(PTQ4ARVGConfig(batch_size=4))
    qvar = method.calibrate(copy.deepcopy(fp_var), calib_set, BITS[1])
    assert not hasattr(qvar, "folded_transforms")
    assert len(method.stages) == 3  # SmoothQuant, shift, GPS
    old_state = _old_layout_state(qvar, method.stages)

    assert method.quantizer_state(qvar).keys() == old_state.keys()
    with pytest.raises(ValueError, match="method instance"):
        PTQ4ARVG(PTQ4ARVGConfig(batch_size=4)).quantizer_state(qvar)  # a fresh instance does not know the folds

    loader = PTQ4ARVG(PTQ4ARVGConfig(batch_size=4))
    fresh = loader.load_quantizer_state(copy.deepcopy(fp_var), old_state, BITS[1])
    for name, p in qvar.named_parameters():
        assert torch.equal(p, fresh.get_parameter(name)), name
    label_B, x_BLC, _ = random_teacher_batch(tiny_vqvae(), seed=11)
    with torch.no_grad():
        assert torch.equal(fresh(label_B, x_BLC), qvar(label_B, x_BLC))
    resaved = loader.quantizer_state(fresh)
    assert resaved.keys() == old_state.keys()
    assert all(torch.equal(resaved[k], old_state[k]) for k in old_state)


def test_smoothquant_does_not_import_ptq4arvg():
    code = ("import sys, varq.quant.methods.smoothquant; "
            "sys.exit(1 if 'varq.quant.methods.ptq4arvg' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(ROOT), timeout=120)


# ------------------------------------------------------------------ ours_litevar extends ours
def test_ours_litevar_is_ours_with_another_name_and_fc2_kept_fp():
    ours, litevar = compose_cfg(["quant=ours"]), compose_cfg(["quant=ours_litevar"])
    expected = {**OmegaConf.to_container(ours.quant), "name": "ours_litevar", "exclude": ["ffn_down"]}
    assert OmegaConf.to_container(litevar.quant) == expected
    assert litevar.calib == ours.calib  # the resampled calibration comes with it
    assert method_config_class("ours_litevar") is OursLiteVARConfig


# ------------------------------------------------------------------ one registry source
TOY_METHOD = '''
"""A toy method: RTN on the head only."""

from dataclasses import dataclass

from varq.quant.factories import dynamic_quantizer, static_weight_quantizer, token_spec, weight_spec
from varq.quant.methods.base import PolicyMethod
from varq.quant.model import QuantPolicy
from varq.quant.registration import MethodConfig, register_method


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"


@register_method("toy", ToyConfig)
class Toy(PolicyMethod):
    def policy(self, bits):
        def linear_quantizers(site, linear, bits):
            return (static_weight_quantizer(linear, weight_spec(bits.w_bits, linear.in_features)),
                    dynamic_quantizer(token_spec(bits.a_bits, linear.in_features)))

        return QuantPolicy(linear_quantizers, include=("head",))
'''

TOY_CHECK = '''
import copy, sys, torch
import varq
from varq.compose import calib_label, compose_run_config
from varq.quant.model import quantizer_state_dict
from varq.quant.qmodules import QuantLinear
from varq.quant.registry import available_methods, get_method
from tests.tiny import tiny_var

assert varq.__file__.startswith(sys.argv[1]), varq.__file__
cfg = compose_run_config(["quant=toy", "bits=w4a8"])  # the copy's own conf/
assert "toy" in available_methods() and cfg.quant_name == "toy" and calib_label(cfg) == "none"
method = get_method("toy")(cfg.quant)
fp = tiny_var()
qvar = method.calibrate(copy.deepcopy(fp), None, cfg.bits)
quantized = sorted(fqn for fqn, m in qvar.named_modules() if isinstance(m, QuantLinear))
assert quantized == ["head"], quantized
w = fp.head.weight
lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)  # per-output-channel min/max, 4 bits
step = (hi - lo) / 15
zero = torch.round(-lo / step)
w_hat = (torch.clamp(torch.round(w / step) + zero, 0, 15) - zero) * step
torch.testing.assert_close(qvar.head.weight_quantizer(w), w_hat, atol=1e-6, rtol=0)
fresh = method.load_quantizer_state(copy.deepcopy(fp), method.quantizer_state(qvar), cfg.bits)
assert quantizer_state_dict(fresh).keys() == quantizer_state_dict(qvar).keys()
print("toy ok")
'''


def _env(*paths: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), "OMP_NUM_THREADS": "1"}


def test_a_method_is_one_module_and_one_yaml(tmp_path):
    """A copy of the package plus quant/methods/toy.py and conf/quant/toy.yaml, nothing else, runs quant=toy."""
    shutil.copytree(ROOT / "varq", tmp_path / "varq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (tmp_path / "varq" / "quant" / "methods" / "toy.py").write_text(textwrap.dedent(TOY_METHOD))
    (tmp_path / "varq" / "conf" / "quant" / "toy.yaml").write_text("# RTN on the head only\nname: toy\n")
    proc = subprocess.run([sys.executable, "-c", TOY_CHECK, str(tmp_path)], env=_env(tmp_path, ROOT), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy ok" in proc.stdout


def test_every_method_module_registers_and_shared_modules_do_not():
    methods_dir = ROOT / "varq" / "quant" / "methods"
    public = {p.stem for p in methods_dir.glob("*.py") if not p.stem.startswith("_")} - {"base"}
    assert public <= set(available_methods())
    assert set(available_methods()) == public | {"ours_litevar"}
    for name in ("base", "_framework", "nope"):
        with pytest.raises(KeyError, match="unknown quantization method"):
            get_method(name)
    assert get_method("brecq") is Brecq


def test_the_library_api_saves_the_folds_the_method_keeps(fp_var, calib_set, tmp_path):
    import varq

    qvar = varq.quantize(copy.deepcopy(fp_var), method="ptq4arvg", bits="w6a6", calib=calib_set,
                         options={"batch_size": 4})
    varq.save_quantized(qvar, tmp_path / "q.pt")
    payload = torch.load(tmp_path / "q.pt", weights_only=True)
    assert any(k.startswith("transforms.") for k in payload["state"])
    # a file written before the rename (options under keep_fp) loads too
    payload["options"]["keep_fp"] = payload["options"].pop("exclude")
    torch.save(payload, tmp_path / "old.pt")
    label_B, x_BLC, _ = random_teacher_batch(tiny_vqvae(), seed=11)
    with torch.no_grad():
        expected = qvar(label_B, x_BLC)
        for path in ("q.pt", "old.pt"):
            assert torch.equal(varq.load_quantized(copy.deepcopy(fp_var), tmp_path / path)(label_B, x_BLC), expected)


@pytest.mark.parametrize("method, old, new", [
    ("brecq", ["quant.low_bits_below=7", "quant.inputs=quant"], ["quant.group_below_bits=7", "quant.recon_inputs=quant"]),
    ("litevar", ["quant.keep_fp=[embed]"], ["quant.exclude=[embed]"]),
    ("ptq4arvg", ["quant.keep_fp=[head]"], ["quant.exclude=[head]"]),
])
def test_a_former_key_on_the_command_line_is_the_same_run(method, old, new, caplog):
    from varq.compose import compose_run_config
    from varq.identity import quant_id

    with caplog.at_level("WARNING"):
        got = compose_run_config([f"quant={method}", *old])
    assert "is deprecated: it is now quant." in caplog.text
    want = compose_run_config([f"quant={method}", *new])
    assert got.quant == want.quant and quant_id(got) == quant_id(want)
    assert got.quant != compose_run_config([f"quant={method}"]).quant  # the old key really took effect
