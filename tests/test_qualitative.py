"""The qualitative figure lines up the same samples of FP16 and each method."""

from __future__ import annotations

import io

from PIL import Image

from varq import pipeline
from varq.report.qualitative import load_samples_at, qualitative_png
from varq.report.rows import load_rows
from varq.results.grid import spread_indices
from varq.sample.generate import load_samples


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
