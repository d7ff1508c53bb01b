"""backend=fp8 in runs: the config key, its validation, the pipeline swap, the run identity, rows and tables.

The numerics of the FP8 GEMMs themselves are tested in tests/quant/test_fp8.py; here the question is whether a run
on the backend computes what it claims. Samples of an fp8 run are *not* equal to the fake-quantized run's at W4A4:
each Linear agrees with its fake quantizer up to fp32 rounding (checked below on the run's own model), but the next
dynamic 4-bit quantizer turns a one-ulp difference at a rounding boundary into a whole step Δ, so the sampled tokens
and images drift apart (measured on var_digits, 200 samples: 0 identical images, class accuracy 0.88 fake vs 0.90
fp8). What is asserted is therefore the layer-wise agreement within the fp32 rounding bound, on the run's model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.test_tables import new_row
from varq import pipeline
from varq.compose import fp16_config
from varq.config import ConfigError
from varq.identity import run_id
from varq.quant.fp8 import FP8Linear, fake_quantize_e4m3_rowwise
from varq.quant.qmodules import QuantLinear
from varq.report.rows import aggregate_cells, load_rows, method_labels
from varq.validate import validate_run

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["model=var_digits", "eval.samples_per_class=1", "eval.batch_size=10", "eval.metrics=[class_accuracy]"]
U = 2.0**-24  # unit roundoff of fp32
CPU = torch.device("cpu")


def _model(cfg, tmp_path: Path):
    """The model a run of ``cfg`` samples from, through the pipeline's own stages."""
    var, vqvae = pipeline.build_model(cfg, CPU)
    paths = pipeline.run_paths(cfg)
    return pipeline.quantize(cfg, var, vqvae, paths, CPU, pipeline.Timings(tmp_path / "timings.json")), vqvae


def _teacher_batch(cfg, vqvae, B: int = 4, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    idx = [torch.randint(cfg.model.vae.vocab_size, (B, pn * pn), generator=gen) for pn in cfg.model.patch_nums]
    label_B = torch.randint(cfg.model.num_classes, (B,), generator=gen)
    with torch.no_grad():
        return label_B, vqvae.idxBl_to_var_input(idx)


def _fp8_layer_inputs(fp8_var, label_B, x_BLCv) -> dict[str, torch.Tensor]:
    """The input every FP8Linear sees in a teacher-forced pass of the fp8 model."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, args[0].detach().clone())
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in fp8_var.named_modules() if isinstance(m, FP8Linear)]
    with torch.no_grad():
        fp8_var(label_B, x_BLCv)
    for hook in hooks:
        hook.remove()
    return seen


def _rounding_bound(x_hat, w_hat, bias) -> torch.Tensor:
    """Worst-case fp32 error of a K-term dot product plus bias and two scalings: (K + 4)·u·(|x̂|·|ŵ|ᵀ + |b|)."""
    k = x_hat.shape[-1]
    b = None if bias is None else bias.abs().double()
    return (k + 4) * U * F.linear(x_hat.abs().double(), w_hat.abs().double(), b)


def test_fp8_run_matches_fake_quantization_layer_by_layer_with_its_own_id(run_config, tmp_path):
    fake_cfg = run_config(*DIGITS, "quant=rtn", "bits=w4a4")
    fp8_cfg = run_config(*DIGITS, "quant=rtn", "bits=w4a4", "backend=fp8")
    assert fake_cfg.backend == "fake"
    assert run_id(run_config(*DIGITS, "quant=rtn", "bits=w4a4", "backend=fake")) == run_id(fake_cfg)
    assert run_id(fp8_cfg) != run_id(fake_cfg)
    assert run_id(fp16_config(fp8_cfg)) == run_id(fp16_config(fake_cfg))  # one FP16 reference for both backends

    fake, fp8 = pipeline.run(fake_cfg), pipeline.run(fp8_cfg)
    assert fp8.paths.run_dir != fake.paths.run_dir and fp8.paths.run_dir.name.startswith("rtn_w4a4_fp8_")
    assert (fake.row["backend"], fp8.row["backend"]) == ("fake", "fp8")
    assert fp8.row["run_id"] == run_id(fp8_cfg) and fp8.reference.paths == fake.reference.paths
    assert fp8.row["n_samples"] == fake.row["n_samples"] == 10

    fake_var, vqvae = _model(fake_cfg, tmp_path)
    fp8_var, _ = _model(fp8_cfg, tmp_path)
    fakes = {n: m for n, m in fake_var.named_modules() if isinstance(m, QuantLinear)}
    assert not any(isinstance(m, QuantLinear) for m in fp8_var.modules())  # no silently mixed run
    inputs = _fp8_layer_inputs(fp8_var, *_teacher_batch(fp8_cfg, vqvae))
    assert sorted(inputs) == sorted(fakes) and len(inputs) == 4 * 5 + 3
    worst = 0.0
    for name, x in inputs.items():
        ql = fakes[name]
        with torch.no_grad():
            y_fp8 = fp8_var.get_submodule(name)(x).double()
            y_fake = ql(x).double()
            bound = _rounding_bound(ql.input_quantizer(x), ql.weight_quantizer(ql.weight), ql.bias)
        assert ((y_fp8 - y_fake).abs() <= bound).all(), name
        worst = max(worst, ((y_fp8 - y_fake).abs() / bound.clamp_min(1e-30)).max().item())
    assert worst > 0  # the two GEMMs really are different computations (integer sum vs dequantized fp32 sum)


def test_w8a8_on_fp8_is_the_e4m3_quantizer_not_int8(run_config, tmp_path):
    fake_cfg = run_config(*DIGITS, "quant=rtn", "bits=w8a8")
    fp8_cfg = run_config(*DIGITS, "quant=rtn", "bits=w8a8", "backend=fp8")
    fake_var, vqvae = _model(fake_cfg, tmp_path)
    fp8_var, _ = _model(fp8_cfg, tmp_path)
    inputs = _fp8_layer_inputs(fp8_var, *_teacher_batch(fp8_cfg, vqvae))
    assert len(inputs) == 4 * 5 + 3
    for name, x in inputs.items():
        ql = fake_var.get_submodule(name)
        with torch.no_grad():
            y_fp8 = fp8_var.get_submodule(name)(x).double()
            x_e4m3, w_e4m3 = fake_quantize_e4m3_rowwise(x), fake_quantize_e4m3_rowwise(ql.weight)
            y_e4m3 = F.linear(x_e4m3, w_e4m3, ql.bias).double()
            y_int8 = ql(x).double()
            bound = _rounding_bound(x_e4m3, w_e4m3, ql.bias)
        assert ((y_fp8 - y_e4m3).abs() <= bound).all(), name
        # int8 and e4m3 grids differ by far more than rounding: another quantizer, hence another run
        assert (y_fp8 - y_int8).abs().max() > 100 * bound.max(), name
    assert run_id(fp8_cfg) != run_id(fake_cfg)


def test_saved_state_is_the_fake_quantized_one_and_reloads_onto_fp8(run_config, tmp_path):
    # brecq fits the backend with fc2 kept FP and no groups; two AdaRound steps are enough to learn a rounding
    cfg = run_config("model=var_digits", "quant=brecq", "bits=w4a4", "backend=fp8", "quant.exclude=[ffn_down]",
                     "quant.weight_group_size=0", "quant.act_group_size=0", "quant.iters=2", "calib.n_images=4",
                     "calib.batch_size=4")
    validate_run(cfg)
    paths = pipeline.run_paths(cfg)
    stages: list[str] = []
    var, vqvae = pipeline.build_model(cfg, CPU)
    first = pipeline.quantize(cfg, var, vqvae, paths, CPU, pipeline.Timings(paths.timings), stages)
    assert stages == ["calibrate"]
    state = torch.load(paths.quantizer_state, weights_only=True)
    assert any(k.endswith("rounding.alpha") for k in state) and not any("e4m3" in k for k in state)

    stages.clear()
    var, vqvae = pipeline.build_model(cfg, CPU)
    again = pipeline.quantize(cfg, var, vqvae, paths, CPU, pipeline.Timings(paths.timings), stages)
    assert stages == []  # loaded, not recalibrated
    layers = {n: m for n, m in again.named_modules() if isinstance(m, FP8Linear)}
    assert len(layers) == 4 * 4 + 3  # every block's ada_lin, mat_qkv, proj, fc1; word_embed, head_nm, head
    for name, layer in layers.items():
        assert torch.equal(layer.weight_e4m3.float(), first.get_submodule(name).weight_e4m3.float()), name

    # the saved state rebuilds the fake-quantized model, whose AdaRound weights are the fp8 layers' codes × scales
    from varq.quant.registry import get_method

    fake = get_method("brecq")(cfg.quant).load_quantizer_state(pipeline.build_model(cfg, CPU)[0], state, cfg.bits)
    for name, layer in layers.items():
        ql = fake.get_submodule(name)
        assert isinstance(ql, QuantLinear)
        with torch.no_grad():
            w_hat = ql.weight_quantizer(ql.weight)
        assert torch.allclose(layer.weight_e4m3.float() * layer.weight_scale_N1, w_hat, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("overrides, needles", [
    (["quant=rtn", "bits=w6a6"], ["backend=fp8", "bits=w6a6", "bits=w4a4", "bits=w8a8"]),
    (["quant=rtn", "bits=w4a4", "quant.weight_group_size=128"], ["quant.weight_group_size", "backend=fake"]),
    (["quant=ours", "bits=w4a4"], ["sign-split", "quant.exclude=[ffn_down]"]),
    (["quant=ours_litevar", "bits=w4a4"], ["grouped scales", "quant.weight_group_size=0"]),
    (["quant=ours_litevar", "bits=w8a8"], ["AdaRound", "quant.iters=0"]),
    (["quant=ptq4arvg", "bits=w8a8"], ["static", "backend=fake"]),
    (["quant=smoothquant", "bits=w8a8"], ["static", "backend=fake"]),
    (["quant=fp16"], ["quantizes nothing", "backend=fake"]),
])
def test_runs_the_backend_cannot_serve_are_refused_before_any_file(run_config, tmp_path, overrides, needles):
    cfg = run_config(*DIGITS, *overrides, "backend=fp8")
    with pytest.raises(ConfigError, match="backend=fp8") as err:
        validate_run(cfg)
    for needle in needles:
        assert needle in str(err.value)
    with pytest.raises(ConfigError):
        pipeline.run(cfg)  # the pipeline refuses too, when called without the command line's validation
    assert not any(tmp_path.iterdir())


def test_unknown_backend_is_refused(run_config, tmp_path):
    with pytest.raises(ConfigError, match="backend='int4' is invalid: choose one of fake, fp8"):
        validate_run(run_config(*DIGITS, "quant=rtn", "backend=int4"))


@pytest.mark.parametrize("overrides", [
    ["quant=rtn", "bits=w4a4"], ["quant=rtn", "bits=w8a8"], ["quant=litevar", "bits=w4a4"],
    ["quant=ours_litevar", "bits=w4a4", "quant.weight_group_size=0", "quant.act_group_size=0"],
    ["quant=ours_litevar", "bits=w8a8", "quant.iters=0"],
    ["quant=brecq", "bits=w4a4", "quant.exclude=[ffn_down]", "quant.weight_group_size=0", "quant.act_group_size=0"],
])
def test_schemes_that_fit_pass_validation(run_config, overrides):
    validate_run(run_config(*DIGITS, *overrides, "backend=fp8"))


def test_cli_refuses_an_fp8_run_before_any_folder_exists(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "varq.run", "quant=rtn", "bits=w6a6", "backend=fp8",
                          f"paths.root={tmp_path}/runs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "backend=fp8" in out.stderr and "bits=w6a6" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_tables_keep_fake_and_fp8_rows_apart(tmp_path):
    runs = tmp_path / "runs"
    new_row(runs, "fake-0", quant="rtn", fid=20.0, seed=0)
    new_row(runs, "fake-1", quant="rtn", fid=22.0, seed=1)
    new_row(runs, "fp8-0", quant="rtn", fid=40.0, seed=0, backend="fp8")  # same quant_id: only the backend differs
    rows = load_rows([runs])
    assert sorted(rows["backend"]) == ["fake", "fake", "fp8"]  # rows written before the column ran on fake
    cells = aggregate_cells(rows)
    by_label = dict(zip(method_labels(cells), cells["fid"]))
    assert by_label == {"rtn": pytest.approx(21.0), "rtn [fp8]": pytest.approx(40.0)}
