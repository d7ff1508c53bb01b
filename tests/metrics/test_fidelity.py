"""IS/FID against closed forms computed here (numpy/scipy), the asset store, and the shipped classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from varq.metrics.extractors import INCEPTION_WEIGHTS_CONFIG_KEY, InceptionWeightsError, inception_weights_path
from varq.metrics.fidelity import (
    evaluate,
    fid_from_features,
    fid_from_stats,
    inception_score_from_logits,
    reference_stats,
)
from varq.models.assets import AssetError, load_asset, save_asset


def _closed_form_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _gaussian(n: int, d: int, seed: int, shift: float, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * scale / np.sqrt(d)  # correlated dimensions, so Σ1Σ2 is not diagonal
    return rng.normal(size=(n, d)) @ mix + shift


def test_fid_of_a_set_with_itself_is_zero() -> None:
    x = torch.from_numpy(_gaussian(500, 16, 0, 0.0, 1.0)).float()
    assert abs(fid_from_features(x, x)) < 1e-6


def test_fid_matches_closed_form_between_gaussians() -> None:
    x, y = _gaussian(2000, 16, 1, 0.0, 1.0), _gaussian(1500, 16, 2, 0.3, 1.5)
    expected = _closed_form_fid(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64))
    got = fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got == pytest.approx(expected, rel=1e-3)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(_closed_form_fid(x, y), rel=1e-6)


def test_inception_score_extremes() -> None:
    constant = torch.zeros(100, 10)
    mean, std = inception_score_from_logits(constant, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # confident, balanced predictions: p(y|x) one-hot, p(y) uniform → exp(KL) = exp(log 10) = 10
    confident = torch.full((1000, 10), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 50.0
    mean, _ = inception_score_from_logits(confident, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-6)


def test_asset_store_round_trip_tamper_and_missing(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    save_asset("toy", state, {"seed": 3}, assets_dir=tmp_path)
    loaded, meta = load_asset("toy", assets_dir=tmp_path)
    assert meta == {"seed": 3} and torch.equal(loaded["w"], state["w"])
    assert set(json.loads((tmp_path / "checksums.json").read_text())) == {"toy"}

    path = tmp_path / "toy.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits inside a tensor: the file still parses, only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="make assets") as err:
        load_asset("toy", assets_dir=tmp_path)
    assert "toy.safetensors" in str(err.value) and "expected" in str(err.value)

    path.unlink()
    with pytest.raises(AssetError, match="missing"):
        load_asset("toy", assets_dir=tmp_path)


def test_inception_weights_error_names_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VARQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(InceptionWeightsError) as err:
        inception_weights_path(None)
    assert INCEPTION_WEIGHTS_CONFIG_KEY in str(err.value) and "VARQ_INCEPTION_WEIGHTS" in str(err.value)
    with pytest.raises(InceptionWeightsError, match=INCEPTION_WEIGHTS_CONFIG_KEY):
        inception_weights_path(str(tmp_path / "nope.pth"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv("VARQ_INCEPTION_WEIGHTS", str(weights))
    assert inception_weights_path(None) == str(weights)


def test_shipped_classifier_and_digits_evaluation(tmp_path: Path) -> None:
    from varq.data import load_digits_split
    from varq.models.classifier import load_digits_classifier

    model = load_digits_classifier()  # verifies the checksum
    images_N3HW, labels_N = load_digits_split("test")
    with torch.no_grad():
        acc = float((model(images_N3HW).argmax(1) == labels_N).double().mean())
    assert acc >= 0.97

    ref = reference_stats("var_digits", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ref-var_digits-*.npz"))) == 1
    assert np.allclose(reference_stats("var_digits", cache_dir=tmp_path)["sigma"], ref["sigma"])
    out = evaluate(images_N3HW, labels_N, extractor="varq-digits", reference=ref, fp16_samples=images_N3HW)
    assert abs(out["fid"]) < 1e-6 and abs(out["fid2fp16"]) < 1e-6  # the reference is these very images
    assert out["class_accuracy"] == pytest.approx(acc)
    assert 8.0 < out["inception_score"] <= 10.0


def test_shipped_checksum_detects_a_copied_tampered_classifier(tmp_path: Path) -> None:
    from varq.models.assets import default_assets_dir
    from varq.models.classifier import load_digits_classifier

    for f in ("digits_classifier.safetensors", "checksums.json"):
        shutil.copy(default_assets_dir() / f, tmp_path / f)
    with open(tmp_path / "digits_classifier.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(AssetError, match="digits_classifier"):
        load_digits_classifier(tmp_path)


def test_evaluate_equals_torch_fidelity_calculate_metrics() -> None:
    from varq.data import load_digits_split
    from varq.metrics.extractors import register_extractors
    from varq.metrics.fidelity import compute_features, feature_stats

    register_extractors()
    register_extractors()  # idempotent: a second call must not trip torch-fidelity's duplicate-name check
    from torch_fidelity import calculate_metrics

    images_N3HW, labels_N = load_digits_split("test")
    fake, real = images_N3HW[:200], images_N3HW[160:]

    class InMemory(torch.utils.data.Dataset):
        def __init__(self, x: torch.Tensor) -> None:
            self.x = x

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.x[i]

    theirs = calculate_metrics(input1=InMemory(fake), input2=InMemory(real), isc=True, fid=True, isc_splits=4,
                               feature_extractor="varq-digits", cuda=False, save_cpu_ram=True, verbose=False,
                               cache=False)
    ref = feature_stats(compute_features(real, "varq-digits")["features"])
    ours = evaluate(fake, labels_N[:200], extractor="varq-digits", reference=ref, isc_splits=4)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    # same formula, other float reduction order (thread count): agreement to 1e-7 relative
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-7)
    assert ours["inception_score_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-7)
    assert ours["fid2fp16"] is None
