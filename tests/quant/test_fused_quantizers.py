"""Compiled dynamic quantizers (varq.quant.fused): which calls take the path, that they give the eager numbers bit
for bit, and that a run switches them on only for itself and keeps its run id."""

from __future__ import annotations

import types

import pytest
import torch

from varq.quant import fused
from varq.quant.factories import static_weight_quantizer, weight_spec
from varq.quant.granularity import PerAxes, PerGroup, PerToken
from varq.quant.quantizer import FakeQuantizer, QuantSpec


@pytest.fixture
def fused_on():
    previous = fused.use_fused_quantizers(True)
    yield
    fused.use_fused_quantizers(previous)


def _x(kind: str, dtype: torch.dtype, shape=(2, 5, 128), seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    if kind == "log2":
        x = x.softmax(-1)
        row = x.view(-1, x.shape[-1])[0]
        row[:3] = torch.tensor([0.0, -0.0, -float(row[3])])  # zeros and a sign to keep
    elif kind == "sign_split":
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(dtype)


def test_only_dynamic_minmax_row_quantizers_at_inference_are_fusable(fused_on):
    x = torch.randn(2, 4, 128)
    token = FakeQuantizer(QuantSpec(4, "uniform", PerGroup(64), dynamic=True))
    with torch.no_grad():
        assert fused.fusable(token, x)
        assert not fused.fusable(FakeQuantizer(QuantSpec(4, "uniform", PerAxes((0, 1)), dynamic=True)), x)
        assert not fused.fusable(FakeQuantizer(QuantSpec(4, "uniform", PerToken(), dynamic=True,
                                                         estimator="percentile")), x)
        linear = torch.nn.Linear(128, 8)
        assert not fused.fusable(static_weight_quantizer(linear, weight_spec(4, 128)), linear.weight)
    with torch.enable_grad():
        assert not fused.fusable(token, x)  # gradients need the straight-through graph of the eager path
    fused.use_fused_quantizers(False)
    with torch.no_grad():
        assert not fused.fusable(token, x)  # off unless asked for


def test_an_enabled_quantizer_routes_through_the_fused_function(fused_on, monkeypatch):
    # the compiled function itself is tested below (slow); here its eager body stands in for it
    calls = []

    def eager(*args):
        calls.append(args[1:])
        return fused._eager(*args)

    monkeypatch.setattr(fused, "_compiled", lambda: eager)
    q = FakeQuantizer(QuantSpec(4, "uniform", PerGroup(64), dynamic=True))
    x = _x("uniform", torch.bfloat16)
    with torch.no_grad():
        got = q(x)
        fused.use_fused_quantizers(False)
        expected = q(x)
    assert calls == [("uniform", 4, 64, False, q.spec.min_step, False)]
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind,bits,granularity,dtype,symmetric", [
    ("uniform", 4, PerGroup(64), torch.bfloat16, False),
    ("uniform", 8, PerToken(), torch.float32, False),
    ("uniform", 4, PerToken(), torch.float32, True),
    ("log2", 4, PerToken(), torch.bfloat16, False),
    ("sign_split", 4, PerGroup(64), torch.float32, False),
    ("sign_split", 6, PerToken(), torch.bfloat16, False),
])
def test_compiled_quantizers_equal_the_eager_ones_bit_for_bit(fused_on, kind, bits, granularity, dtype, symmetric):
    q = FakeQuantizer(QuantSpec(bits, kind, granularity, dynamic=True, symmetric=symmetric))
    for shape in ((2, 5, 128), (2, 3, 7, 128)):  # Linear inputs (B, L, C) and attention operands (B, H, L, c)
        x = _x(kind, dtype, shape)
        with torch.no_grad():
            got = q(x)
            fused.use_fused_quantizers(False)
            expected = q(x)
            fused.use_fused_quantizers(True)
        assert got.dtype == expected.dtype == dtype
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


@pytest.mark.slow
def test_a_quantized_model_samples_the_same_tokens_with_compiled_quantizers(fused_on):
    from tests.tiny import tiny_var, tiny_vqvae
    from varq.bench import quantized_model
    from varq.sample.sampler import generate

    qvar, vqvae = quantized_model(tiny_var(), "ours", "w4a4"), tiny_vqvae()
    runs = []
    for flag in (True, False):
        fused.use_fused_quantizers(flag)
        logits: list[torch.Tensor] = []
        img = generate(qvar, vqvae, torch.tensor([0, 1]), rng=torch.Generator().manual_seed(1), top_k=0, top_p=0.0,
                       on_logits=lambda _si, l_2BlV, out=logits: out.append(l_2BlV.clone()))
        runs.append((img, logits))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_run_id_ignores_the_option_and_a_run_switches_it_for_itself_only(tmp_path, monkeypatch):
    from tests.conftest import compose_cfg
    from varq import pipeline
    from varq.compose import to_run_config
    from varq.identity import run_id

    base = [f"paths.root={tmp_path}/runs", f"paths.cache={tmp_path}/cache", "model=var_tiny", "quant=fp16",
            "eval=smoke", "eval.classes=[0]", "eval.samples_per_class=1", "eval.batch_size=2", "eval.metrics=[]"]
    off, on = (to_run_config(compose_cfg([*base, f"eval.fused_quantizers={v}"])) for v in ("false", "true"))
    assert run_id(off) == run_id(on)
    seen = []

    def stub(cfg, *args, **kwargs):  # stands in for the run itself: only the switch matters here
        seen.append(fused.fused_quantizers_enabled())
        return types.SimpleNamespace()

    monkeypatch.setattr(pipeline, "_run_locked", stub)
    pipeline.run(on)
    pipeline.run(off)
    assert seen == [True, False] and not fused.fused_quantizers_enabled()
