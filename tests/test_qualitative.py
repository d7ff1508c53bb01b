"""The qualitative figure lines up the same samples of FP16 and each method."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from varq import pipeline
from varq.report.qualitative import load_samples_at, qualitative_png
from varq.report.rows import load_rows
from varq.results.grid import spread_indices
from varq.sample.generate import load_samples
from varq.sample.shards import shard_path, write_shard
from varq.tables import main as tables_main


def test_spread_indices_cover_every_class():
    assert spread_indices(1000, 10) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert spread_indices(3, 10) == [0, 1, 2]


def test_qualitative_figure_from_real_runs(run_config, tmp_path):
    overrides = ["model=var_tiny", "eval=smoke", "eval.classes=[0,1,2,3]", "eval.samples_per_class=2",
                 "eval.batch_size=3", "quant=rtn", "bits=w4a4"]
    cfg = run_config(*overrides)
    result = pipeline.run(cfg)
    images, _ = load_samples(cfg.eval, cfg.model.num_classes, result.paths.samples_dir)
    picked = load_samples_at(result.paths.run_dir, [0, 4, 7])
    assert (picked == images[[0, 4, 7]].numpy()).all()  # crosses shard boundaries (batch size 3)
    rows = load_rows([tmp_path / "runs"])
    png = qualitative_png(rows, columns=4, scale=2)
    figure = Image.open(io.BytesIO(png))
    assert figure.height == 2 * (16 * 2 + 2)  # two strips: fp16 and rtn


def _fake_run(root, run_id, value, **row):
    """A run directory with config.json, one shard of constant-valued 4×4 samples and its row.json."""
    run_dir = root / run_id
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"eval": {"batch_size": 8}}))
    images = np.full((8, 3, 4, 4), value, dtype=np.uint8)
    write_shard(shard_path(run_dir / "samples", 0), images, np.arange(8) % 4, seed=row.get("seed", 0))
    fields = {"run_id": run_id, "model": "var_digits", "task": "class_cond", "calib": "random", "n_samples": 8,
              "seed": 0, "protocol_id": "pA", "quant_id": "q", "calib_id": "c", "calib_seed": 0, **row}
    (run_dir / "row.json").write_text(json.dumps(fields))


def test_qualitative_has_one_fp16_row_same_seed_and_no_zero_rows(tmp_path):
    runs = tmp_path / "runs"
    fp = {"quant": "fp16", "bits": "fp16", "calib": "none", "calib_id": "none", "calib_seed": None}
    _fake_run(runs, "fp_s0", 10, **fp)
    _fake_run(runs, "fp_s1", 20, **fp, seed=1)
    _fake_run(runs, "fp_other_protocol", 60, **fp, protocol_id="pB")
    _fake_run(runs, "rtn", 30, quant="rtn", bits="w4a4", calib="none", calib_id="none", calib_seed=None)
    _fake_run(runs, "rtn_s1", 35, quant="rtn", bits="w4a4", calib="none", calib_id="none", calib_seed=None, seed=1)
    _fake_run(runs, "brecq_c1", 50, quant="brecq", bits="w4a4", calib_seed=1)
    _fake_run(runs, "brecq_c0", 40, quant="brecq", bits="w4a4", calib_seed=0)
    _fake_run(runs, "ours_zeros", 0, quant="ours", bits="w4a4")
    rows = load_rows([runs])
    with pytest.raises(ValueError, match="exactly one protocol"):
        qualitative_png(rows)
    png = qualitative_png(rows[rows["protocol_id"] == "pA"], columns=4, scale=2)
    figure = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    strip_h = 4 * 2 + 2
    assert figure.shape[0] == 3 * strip_h  # fp16, brecq, rtn: one FP16 row, the all-zero ours row left out
    # Same eval seed (0) everywhere and the smallest calibration seed: FP16 = 10, brecq = 40 (calib 0), rtn = 30.
    assert [int(figure[k * strip_h + 1, -1, 0]) for k in range(3)] == [10, 40, 30]

    out = tmp_path / "out"
    assert tables_main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    assert sorted(p.name for p in (out / "plots").glob("qualitative_*")) == [
        "qualitative_class_cond_var_digits_pA_w4a4.png"]  # pB has FP16 only: nothing to compare
