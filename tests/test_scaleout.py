"""varq.scaleout: shards of one run are disjoint, cover the plan, and merge into the same row as one job."""

from __future__ import annotations

import json

import pytest

from varq import pipeline
from varq.config import ConfigError
from varq.quant.registry import available_methods
from varq.sample.layout import plan_batches
from varq.scaleout import generate_shard, generate_shards_with_submitit

TINY = ("model=var_tiny", "eval=smoke", "device=cpu", "eval.samples_per_class=2", "eval.batch_size=3")


def _batch_files(cfg):
    return sorted(p.name for p in pipeline.run_paths(cfg).samples_dir.glob("*.npz"))


def test_shards_are_disjoint_and_cover_the_plan(run_config):
    cfg = run_config(*TINY, "eval.num_shards=3")
    plan = plan_batches(cfg.eval, cfg.model.num_classes)
    seen: set[str] = set()
    for k in range(3):
        before = set(_batch_files(cfg))
        made = generate_shard(cfg, k)
        new = set(_batch_files(cfg)) - before
        assert made == len(new) and not (new & seen)
        seen |= new
    assert seen == {f"batch_{p.index:06d}.npz" for p in plan}
    assert generate_shard(cfg, 1) == 0  # resumable: nothing left to do
    assert "generate" not in pipeline.run(cfg).stages_run  # the merge only computes metrics and the row


def test_shard_index_is_validated(run_config):
    cfg = run_config(*TINY, "eval.num_shards=2")
    with pytest.raises(ConfigError, match="shard=2"):
        generate_shard(cfg, 2)


def test_sharded_samples_equal_unsharded(run_config, tmp_path):
    import numpy as np

    sharded = run_config(*TINY, "eval.num_shards=2")
    for k in range(2):
        generate_shard(sharded, k)
    whole = pipeline.run(run_config(*TINY, f"paths.root={tmp_path}/whole"))
    for name in _batch_files(sharded):
        a = np.load(pipeline.run_paths(sharded).samples_dir / name)["images"]
        b = np.load(whole.paths.samples_dir / name)["images"]
        assert np.array_equal(a, b), name


def test_fan_out_with_submitit_executor(run_config, tmp_path):
    submitit = pytest.importorskip("submitit")
    quant = "rtn" if "rtn" in available_methods() else "fp16"
    cfg = run_config(*TINY, f"quant={quant}", "bits=w8a8", "eval.num_shards=2")
    executor = submitit.DebugExecutor(folder=tmp_path / "submitit")  # in-process: same code path, no scheduler
    result = generate_shards_with_submitit(cfg, executor)
    assert json.loads(result.paths.row.read_text())["n_samples"] == 16
    assert "generate" not in result.stages_run
    if quant != "fp16":
        assert result.reference is not None and result.reference.paths.row.is_file()
        assert len(list((result.reference.paths.run_dir / "shard_timings").glob("shard_*.json"))) == 2
