"""The library API: quantize / save_quantized / load_quantized round trip, lazy import, the README example."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import varq
from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae

README = Path(__file__).resolve().parents[1] / "README.md"
OURS_FAST = {"iters": 2, "theta_grid": 100}  # AdaRound state exists, in seconds


def _logits(model, vqvae) -> torch.Tensor:
    label_B, x_BLC, _ = random_teacher_batch(vqvae, B=4, seed=1)
    with torch.no_grad():
        return model(label_B, x_BLC)


def test_quantize_save_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    var, vqvae = tiny_var(), tiny_vqvae()
    fp_logits = _logits(var, vqvae)
    fresh_fp = copy.deepcopy(var)
    qvar = varq.quantize(var, method="ours", bits="w4a4", vqvae=vqvae,
                         calib={"name": "random", "n_images": 4, "batch_size": 4}, options=OURS_FAST)
    q_logits = _logits(qvar, vqvae)
    assert (q_logits - fp_logits).abs().max() > 1e-3  # it really is quantized at W4A4
    varq.save_quantized(qvar, tmp_path / "q.pt")
    loaded = varq.load_quantized(fresh_fp, tmp_path / "q.pt")
    assert torch.equal(_logits(loaded, vqvae), q_logits)
    saved = torch.load(tmp_path / "q.pt", weights_only=True)
    assert saved["method"] == "ours" and saved["bits"]["name"] == "w4a4" and saved["options"]["iters"] == 2
    assert any("alpha" in k for k in saved["state"])  # AdaRound's learned rounding travels with the file


def test_quantize_accepts_a_ready_calibration_set_and_other_methods() -> None:
    from varq.calib.calib_set import CalibSet

    var, vqvae = tiny_var(), tiny_vqvae()
    labels = torch.arange(2)
    idx = [torch.randint(32, (2, pn * pn), generator=torch.Generator().manual_seed(pn)) for pn in var.patch_nums]
    calib = CalibSet(labels_N=labels, seeds_N=torch.zeros(2, dtype=torch.long), idx_per_scale=idx,
                     teacher_input_NLC=vqvae.idxBl_to_var_input(idx).float(), num_classes=10, cfg=1.5)
    a = varq.quantize(copy.deepcopy(var), method="rtn", bits="w8a8")  # rtn needs no calibration data
    b = varq.quantize(copy.deepcopy(var), method="ours", bits="w4a4", calib=calib, vqvae=vqvae, options={"iters": 0})
    fp = _logits(var, vqvae)
    assert (_logits(a, vqvae) - fp).abs().max() < (_logits(b, vqvae) - fp).abs().max()  # W8A8 RTN is closer to FP


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nope"}, "unknown method"),
    ({"bits": "w3a3"}, "invalid"),
    ({"options": {"not_a_key": 1}}, "invalid"),
    ({"calib": "random"}, "vqvae="),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, message) -> None:
    var = tiny_var()
    before = copy.deepcopy(var.state_dict())
    with pytest.raises(ValueError, match=message):
        varq.quantize(var, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in var.state_dict().items())


def test_save_refuses_a_model_not_from_quantize(tmp_path) -> None:
    with pytest.raises(ValueError, match="not returned by varq.quantize"):
        varq.save_quantized(tiny_var(), tmp_path / "q.pt")
    assert not (tmp_path / "q.pt").exists()


def test_import_varq_does_no_heavy_work() -> None:
    code = "import sys, varq; print(sorted(m for m in ('torch', 'hydra', 'varq.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
    assert callable(varq.quantize) and "quantize" in dir(varq)


def test_readme_library_example_runs_on_the_tiny_model(tmp_path, monkeypatch) -> None:
    section = README.read_text().split("## Library API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace('"var_digits"', '"var_tiny"'), "README.md", "exec"), namespace)
    assert namespace["images"].shape == (10, 3, 16, 16) and (tmp_path / "ours_w4a4.pt").is_file()
    assert torch.isfinite(namespace["images"]).all()
