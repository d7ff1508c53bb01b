"""The pipeline: stages skip finished artifacts, damaged shards are regenerated, the FP16 reference is shared."""

from __future__ import annotations

import json

import pytest
import torch

from varq import pipeline
from varq.config import ConfigError
from varq.sample import generate as gen_module

TINY = ["model=var_tiny", "quant=fp16", "eval=smoke", "eval.classes=[0,1,2,3,4,5,6,7,8,9]", "eval.samples_per_class=2",
        "eval.batch_size=8", "eval.metrics=[fid,fid2fp16,class_accuracy]"]


def test_fp16_run_writes_row_and_artifacts(run_config, count_batches):
    result = pipeline.run(run_config(*TINY))
    row = result.row
    assert row["model"] == "var_tiny" and row["quant"] == "fp16" and row["bits"] == "fp16"
    assert row["n_samples"] == 20 and row["fid"] is not None and row["fid2fp16"] is None
    assert 0.0 <= row["class_accuracy"] <= 1.0
    assert sorted(count_batches) == [0, 1, 2]
    for name in ("row.json", "metrics.json", "config.json", "grid.png", "timings.json"):
        assert (result.paths.run_dir / name).is_file()
    assert json.loads(result.paths.row.read_text()) == row
    # a complete run is a no-op
    again = pipeline.run(run_config(*TINY))
    assert again.row == row and sorted(count_batches) == [0, 1, 2]


def test_kill_after_generation_resumes_without_regenerating(run_config, count_batches):
    cfg = run_config(*TINY)
    first = pipeline.run(cfg)
    first.paths.row.unlink()
    first.paths.metrics.unlink()  # as if killed between generation and metrics
    count_batches.clear()
    second = pipeline.run(cfg)
    assert count_batches == []
    assert second.row["fid"] == pytest.approx(first.row["fid"])


def test_truncated_or_corrupt_shard_is_regenerated(run_config, count_batches):
    cfg = run_config(*TINY)
    first = pipeline.run(cfg)
    images_before, _ = gen_module.load_samples(cfg.eval, cfg.model.num_classes, first.paths.samples_dir)
    shard = first.paths.samples_dir / "batch_000001.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (first.paths.samples_dir / "batch_000002.npz").write_bytes(b"garbage")
    first.paths.row.unlink()
    first.paths.metrics.unlink()
    count_batches.clear()
    pipeline.run(cfg)
    assert sorted(count_batches) == [1, 2]
    images_after, _ = gen_module.load_samples(cfg.eval, cfg.model.num_classes, first.paths.samples_dir)
    assert torch.equal(images_before, images_after)  # deterministic: the same samples come back


def test_unknown_keys_and_bad_bits_fail_early(run_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="w3a3") as err:
        run_config("bits=w3a3")
    assert "w4a4" in str(err.value.__cause__ or err.value) or "w4a4" in repr(err.value)
    with pytest.raises(ConfigCompositionException, match="nope"):
        run_config("quant=nope")
    with pytest.raises(ConfigCompositionException, match="dpeth"):
        run_config("model.dpeth=3")  # typo: Hydra's struct mode refuses unknown keys


def test_type_errors_are_config_errors(run_config):
    with pytest.raises(ConfigError, match="samples_per_class"):
        run_config("eval.samples_per_class=many")


def test_fp16_reference_is_generated_once_and_shared(run_config, count_batches):
    quantized = [run_config("model=var_tiny", "quant=rtn", f"bits={b}", *TINY[2:]) for b in ("w8a8", "w4a4")]
    results = [pipeline.run(cfg) for cfg in quantized]
    # 3 batches for the shared FP16 reference + 3 per quantized run; never the reference twice
    assert len(count_batches) == 3 * 3
    assert results[0].reference.paths.run_dir == results[1].reference.paths.run_dir
    assert results[0].reference.row["quant"] == "fp16"
    for r in results:
        assert r.row["fid2fp16"] is not None and r.row["fid2fp16"] >= 0
    assert results[0].row["fid2fp16"] < results[1].row["fid2fp16"]  # 8 bits stay closer to FP16 than 4


def test_fp16_reference_features_are_extracted_once(run_config, monkeypatch):
    from varq.metrics import fidelity

    quantized = [run_config("model=var_tiny", "quant=rtn", f"bits={b}", *TINY[2:]) for b in ("w8a8", "w4a4")]
    first = pipeline.run(quantized[0])
    cache = first.reference.paths.run_dir / "feature_stats_varq-digits.npz"
    assert cache.is_file()
    real = fidelity.compute_features
    seen = []
    monkeypatch.setattr(fidelity, "compute_features", lambda imgs, *a, **k: seen.append(len(imgs)) or real(imgs, *a, **k))
    second = pipeline.run(quantized[1])
    assert seen == []  # the second run's own features go through evaluate, not compute_features
    def features(folder):
        return real(gen_module.load_samples(quantized[1].eval, 10, folder)[0])["features"]

    direct = fidelity.fid_from_features(features(second.paths.samples_dir), features(first.reference.paths.samples_dir))
    assert second.row["fid2fp16"] == pytest.approx(direct, rel=1e-6)
