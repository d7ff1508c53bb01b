"""varq-eval: a run's exported npz reproduces the run's own FID; sample folders, ADM references, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from varq import pipeline
from varq.evaluate import main
from varq.metrics.fidelity import reference_from_images
from varq.metrics.manifold import precision_recall
from varq.sample.export import load_run_samples

SMOKE = ["model=var_tiny", "quant=fp16", "eval=smoke", "eval.classes=[0,1,2,3,4,5,6,7,8,9]", "eval.samples_per_class=2",
         "eval.batch_size=8", "eval.metrics=[fid,sfid,precision,recall]", "device=cpu"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from tests.conftest import compose_cfg
    from varq.compose import to_run_config

    root = tmp_path_factory.mktemp("smoke")
    cfg = to_run_config(compose_cfg([f"paths.root={root}/runs", f"paths.cache={root}/cache", *SMOKE]))
    result = pipeline.run(cfg)
    (reference,) = (root / "cache" / "reference").glob("ref-var_digits-*.npz")
    return result, reference


def _eval(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_exported_npz_reproduces_the_runs_own_fid(smoke_run, tmp_path, capsys) -> None:
    result, reference = smoke_run
    metrics = json.loads((result.paths.run_dir / "metrics.json").read_text())
    out = tmp_path / "samples.npz"
    exported = _eval(capsys, "export", str(result.paths.run_dir), str(out))
    assert exported["n_images"] == 20
    with np.load(out) as data:
        assert data["arr_0"].shape == (20, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        images, labels = load_run_samples(result.paths.run_dir)
        np.testing.assert_array_equal(data["arr_0"], images.permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(data["arr_1"], labels.numpy())
    scored = _eval(capsys, str(out), "--ref", str(reference), "--out", str(tmp_path / "scores.json"))
    assert scored["extractor"] == "varq-digits"  # from the reference file
    for key in ("fid", "sfid", "precision", "recall"):
        assert abs(scored[key] - metrics[key]) <= 1e-6, key
    assert json.loads((tmp_path / "scores.json").read_text()) == scored
    from_run_dir = _eval(capsys, str(result.paths.run_dir), "--ref", str(reference))
    assert abs(from_run_dir["fid"] - metrics["fid"]) <= 1e-6 and from_run_dir["samples_kind"] == "run"


def test_png_folder_scores_like_the_npz(smoke_run, tmp_path, capsys) -> None:
    result, reference = smoke_run
    images, _ = load_run_samples(result.paths.run_dir)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    from_pngs = _eval(capsys, str(folder), "--ref", str(reference), "--metrics", "sfid")
    metrics = json.loads((result.paths.run_dir / "metrics.json").read_text())
    assert from_pngs["samples_kind"] == "folder" and from_pngs["class_accuracy"] is None  # a folder has no labels
    assert abs(from_pngs["fid"] - metrics["fid"]) <= 1e-6 and abs(from_pngs["sfid"] - metrics["sfid"]) <= 1e-6
    assert "precision" not in from_pngs


def test_reference_with_only_mu_sigma_gives_fid_and_names_what_is_missing(smoke_run, tmp_path, capsys) -> None:
    result, reference = smoke_run
    with np.load(reference) as data:
        np.savez(tmp_path / "stats_only.npz", mu=data["mu"], sigma=data["sigma"])
    with pytest.warns(UserWarning, match="not computed"):
        scored = _eval(capsys, str(result.paths.run_dir), "--ref", str(tmp_path / "stats_only.npz"),
                       "--metrics", "sfid", "precision", "recall")
    metrics = json.loads((result.paths.run_dir / "metrics.json").read_text())
    assert abs(scored["fid"] - metrics["fid"]) <= 1e-6
    assert scored["sfid"] is None and scored["precision"] is None and scored["recall"] is None
    assert set(scored["missing"]) == {"sfid", "precision", "recall"}
    assert "mu_s" in scored["missing"]["sfid"] and "arr_0" in scored["missing"]["precision"]
    by_default = _eval(capsys, str(result.paths.run_dir), "--ref", str(tmp_path / "stats_only.npz"))
    assert by_default["sfid"] is None and by_default["missing"] == scored["missing"]


def test_adm_style_reference_images_give_precision_recall(smoke_run, tmp_path, capsys) -> None:
    """ADM's batch holds statistics and images (arr_0) but no features: they are extracted once and cached."""
    from varq.data.digits import load_digits_split

    result, _ = smoke_run
    real, _ = load_digits_split("test", image_size=16)
    real = real[:120]
    ref = reference_from_images(real, "varq-digits")
    adm = tmp_path / "adm_ref.npz"
    np.savez(adm, arr_0=real.permute(0, 2, 3, 1).numpy(), mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"],
             sigma_s=ref["sigma_s"])
    cache = tmp_path / "cache"
    scored = _eval(capsys, str(result.paths.run_dir), "--ref", str(adm), "--extractor", "varq-digits",
                   "--cache", str(cache))
    images, _ = load_run_samples(result.paths.run_dir)
    from varq.metrics.fidelity import compute_features

    expected = precision_recall(torch.from_numpy(ref["features"]), compute_features(images, "varq-digits")["features"])
    assert (scored["precision"], scored["recall"]) == pytest.approx(expected, abs=1e-12)
    assert len(list(cache.glob("ref-features-*.npz"))) == 1


def test_reference_subcommand_writes_a_full_reference(tmp_path, capsys) -> None:
    out = tmp_path / "digits_ref.npz"
    made = _eval(capsys, "reference", "var_digits", str(out), "--image-size", "16")
    assert made["extractor"] == "varq-digits" and made["feature_dims"] == {"pool": 128, "spatial": 448}
    with np.load(out) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "features", "extractor"} <= set(data.files)
        assert data["features"].shape == (made["n_images"], 128) and str(data["extractor"]) == "varq-digits"


@pytest.mark.parametrize("argv, message", [
    (["{npz}", "--ref", "{ref}", "--metrics", "fidd"], "unknown metric"),
    (["{npz}", "--ref", "{missing}"], "does not exist"),
    (["{npz}", "--ref", "{ref}", "--out", "{missing}/x/out.json"], "does not exist"),
    (["{bad}", "--ref", "{ref}"], "arr_0"),
    (["{npz}", "--ref", "{ref}", "--extractor", "inception"], "computed with extractor 'varq-digits'"),
    (["export", "{missing}", "{out}"], "not a varq run directory"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(smoke_run, tmp_path, capsys, argv, message) -> None:
    result, reference = smoke_run
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    paths = {"npz": tmp_path / "bad.npz", "ref": reference, "missing": tmp_path / "nope", "bad": tmp_path / "bad.npz",
             "out": tmp_path / "out.npz"}
    if "{npz}" in argv:
        from varq.sample.export import export_run

        paths["npz"] = export_run(result.paths.run_dir, tmp_path / "good.npz")[0]
    before = sorted(Path(tmp_path).rglob("*"))
    assert main([a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert sorted(Path(tmp_path).rglob("*")) == before


@pytest.mark.slow
def test_inception_path_end_to_end_with_offline_weights(smoke_run, tmp_path, capsys) -> None:
    """`reference` then `score` with --extractor inception and a local weights file (random ones: none ship)."""
    from tests.metrics.test_spatial import _random_inception_weights

    result, _ = smoke_run
    weights = _random_inception_weights(tmp_path / "inception.pth")
    samples = tmp_path / "samples.npz"
    _eval(capsys, "export", str(result.paths.run_dir), str(samples))
    ref = tmp_path / "ref.npz"
    made = _eval(capsys, "reference", str(samples), str(ref), "--extractor", "inception", "--inception-weights", weights)
    assert made["feature_dims"] == {"pool": 2048, "spatial": 2023}
    scored = _eval(capsys, str(samples), "--ref", str(ref), "--inception-weights", weights)
    assert scored["extractor"] == "inception"
    assert abs(scored["fid"]) < 1e-3 and abs(scored["sfid"]) < 1e-3  # the reference is the same 20 images
    assert scored["precision"] == 1.0 and scored["recall"] == 1.0
