"""varq.tracking: W&B mirrors the run directory and can never cost a result."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from tests.wandb_offline import offline_runs
from varq.config import ConfigError, LoggerConfig
from varq.progress import Progress
from varq.tracking import InitFailures, Tracker, TrackingWarning, run_tracked, track_result

ROW = {"run_id": "abc", "model": "var_tiny", "quant": "fp16", "bits": "fp16", "fid": 12.5, "inception_score": 3.25,
       "class_accuracy": None, "n_samples": 8, "git_sha": "deadbee"}
TIMINGS = {"time_build_s": 0.1, "time_generate_s": 2.0}


@pytest.fixture
def offline(monkeypatch):
    # conftest disables W&B for the whole suite; these tests exercise the real offline writer
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def fresh_init_memo(monkeypatch):
    # a failed init is remembered for the process; each test starts as a fresh process would
    from varq import tracking

    monkeypatch.setattr(tracking.PROCESS_INIT_FAILURES, "reasons", {})


@pytest.fixture
def grid_png(tmp_path):
    from PIL import Image

    path = tmp_path / "grid.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
    return path


def test_logger_none_does_nothing(run_config, tmp_path):
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=none")
    tracker = Tracker(cfg.logger)
    assert not tracker.enabled
    tracker.start(cfg, tmp_path / "runs" / "x")
    tracker.log_row(ROW, None, TIMINGS)
    tracker.finish()
    assert not (tmp_path / "runs").exists()


def test_disabled_mode_writes_nothing(run_config, tmp_path):
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb", "logger.mode=disabled")
    tracker = Tracker(cfg.logger)
    tracker.start(cfg, tmp_path / "runs" / "x")
    tracker.log_row(ROW, None, TIMINGS)
    tracker.finish()
    assert not (tmp_path / "runs" / "wandb").exists()


def test_bad_logger_settings_are_config_errors():
    with pytest.raises(ConfigError, match="logger.mode"):
        Tracker(LoggerConfig(name="wandb", mode="onlin"))
    with pytest.raises(ConfigError, match="logger="):
        Tracker(LoggerConfig(name="tensorboard"))
    with pytest.raises(ConfigError, match="logger.artifacts"):
        Tracker(LoggerConfig(name="wandb", artifacts=["weights"]))


def test_offline_run_lands_under_paths_root(offline, run_config, tmp_path, grid_png, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd would show up here, outside runs/
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb", "logger.tags=[unit]")
    tracker = Tracker(cfg.logger)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        tracker.start(cfg, tmp_path / "runs" / "var_tiny" / "fp16_fp16_abc")
        tracker.log_row(ROW, grid_png, TIMINGS)
        tracker.finish()
    files = list((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    for name in (b"fid", b"inception_score", b"n_samples", b"time_generate_s"):
        assert name in blob
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/files/media/table/*.table.json"))
    assert not (tmp_path / "wandb").exists()


def test_missing_wandb_package_only_warns(offline, run_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb")
    tracker = Tracker(cfg.logger)
    with pytest.warns(TrackingWarning, match="init failed"):
        tracker.start(cfg, tmp_path / "runs" / "x")
    tracker.log_row(ROW, None, TIMINGS)  # silently off after the first failure
    tracker.finish()


def test_failures_inside_wandb_only_warn(offline, run_config, tmp_path, monkeypatch):
    import wandb

    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb")

    def broken_init(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = Tracker(cfg.logger)
    with pytest.warns(TrackingWarning, match="No space left"):
        tracker.start(cfg, tmp_path / "runs" / "x")

    class FlakyRun:
        summary: dict = {}
        config = type("Config", (), {"update": lambda self, *a, **k: None})()

        def log(self, payload):
            raise RuntimeError("wandb-core went away")

        def finish(self):
            raise AssertionError("finish must not be called after a failed log")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    tracker = Tracker(cfg.logger, InitFailures())  # a new process: the failed init above is not remembered
    tracker.start(cfg, tmp_path / "runs" / "x")
    with pytest.warns(TrackingWarning, match="wandb-core went away"):
        tracker.log_row(ROW, None, TIMINGS)
    tracker.finish()


def test_pipeline_result_survives_a_broken_tracker(offline, run_config, monkeypatch):
    import wandb

    from varq import pipeline

    cfg = run_config("model=var_tiny", "eval=smoke", "device=cpu", "logger=wandb")
    result = pipeline.run(cfg)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: (_ for _ in ()).throw(ConnectionError("no network")))
    with pytest.warns(TrackingWarning, match="no network"):
        track_result(Tracker(cfg.logger), cfg, result)
    assert json.loads(result.paths.row.read_text()) == result.row


def _run_dir(tmp_path, name="ours_w4a4_abc"):
    return tmp_path / "runs" / "var_tiny" / name


def test_fresh_row_next_to_a_reloaded_one(offline, run_config, tmp_path, grid_png):
    """A row fresh from the pipeline holds torch.__version__ (TorchVersion, a str subclass); the FP16 row read back
    from row.json holds str. Both land in one table, as plain strings, without a warning."""
    import torch

    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb", "quant=rtn")
    assert type(torch.__version__) is not str  # the premise: a fresh value is not a plain str
    fresh = {**ROW, "quant": "rtn", "bits": "w4a4", "torch_version": torch.__version__}
    reloaded = json.loads(json.dumps({**ROW, "torch_version": str(torch.__version__)}))
    tracker = Tracker(cfg.logger)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        tracker.start(cfg, _run_dir(tmp_path))
        tracker.log_row(fresh, grid_png, TIMINGS, reference_row=reloaded, reference_grid_path=grid_png)
        tracker.finish()
    (run,) = offline_runs(tmp_path / "runs" / "wandb")
    (table,) = run.tables("rows")
    col = table["columns"].index("torch_version")
    assert [r[col] for r in table["data"]] == [str(torch.__version__)] * 2
    assert [r[table["columns"].index("quant")] for r in table["data"]] == ["fp16", "rtn"]


def test_settings_go_to_config_metrics_to_summary_grids_side_by_side(offline, run_config, tmp_path, grid_png):
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb", "quant=rtn", "bits=w6a6", "eval.seed=7",
                     "logger.tags=[mine]")
    tracker = Tracker(cfg.logger)
    tracker.start(cfg, _run_dir(tmp_path))
    tracker.log_row({**ROW, "quant": "rtn", "bits": "w6a6", "fid": 20.0}, grid_png, TIMINGS,
                    reference_row=ROW, reference_grid_path=grid_png)
    tracker.finish()
    (run,) = offline_runs(tmp_path / "runs" / "wandb")
    assert run.group == "var_tiny/smoke/class_cond"
    assert set(run.tags) == {"model:var_tiny", "quant:rtn", "bits:w6a6", "calib:none", "seed:7", "mine"}
    assert run.config["row"]["n_samples"] == 8 and run.config["row"]["git_sha"] == "deadbee"
    assert run.config["quant"]["name"] == "rtn" and run.config["bits"]["name"] == "w6a6"
    logged = {k for h in run.history for k in h if not k.startswith("_")}
    assert logged == {"rows", "samples"}  # no one-point scalar panels: settings and metrics are not history
    assert run.summary["fid"] == 20.0 and run.summary["fp16/fid"] == 12.5
    assert run.summary["time_generate_s"] == 2.0 and run.summary["stage"] == "done"
    (samples,) = run.series("samples")
    assert samples["count"] == 2 and len(run.media("images")) >= 1  # FP16 and quantized in one panel
    assert samples["captions"] == ["fp16 fp16", "rtn w6a6"]


def test_run_opens_at_start_streams_progress_and_a_crash_keeps_its_stage(offline, run_config, tmp_path):
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb", "quant=rtn")
    tracker = Tracker(cfg.logger)
    from varq.pipeline import fp16_config, run_paths

    reference = run_paths(fp16_config(cfg)).run_dir.name

    def pipeline(c):
        with Progress("generate", total=2, run=reference, mode="off") as p:
            p.update(1)
            p.update(1)
        with Progress("reconstruct", total=3, mode="off") as p:
            for loss in (0.5, 0.25, 0.125):
                p.update(0, unit="blocks.0.attn", loss=loss, iters=10)
                p.update(1)
        with Progress("generate", total=4, run=run_paths(c).run_dir.name, mode="off") as p:
            p.update(1)
            raise MemoryError("CUDA out of memory")

    with pytest.raises(MemoryError):
        run_tracked(tracker, cfg, pipeline)
    (run,) = offline_runs(tmp_path / "runs" / "wandb")
    assert run.series("reconstruct/loss") == [0.5, 0.25, 0.125]
    assert run.series("fp16/generate/done") == [1, 2]
    assert run.summary["stage"] == "generate" and run.summary["status"].startswith("failed: MemoryError")
    assert "fp16/time/generate_s" in run.summary and "time/reconstruct_s" in run.summary
    assert run.exit_code == 1


def test_failed_init_is_not_retried_for_later_sweep_points(offline, run_config, tmp_path, monkeypatch):
    import wandb

    calls = []

    def refused(**kwargs):
        calls.append(kwargs["name"])
        raise ConnectionError("server refused")

    monkeypatch.setattr(wandb, "init", refused)
    cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb")
    memo = InitFailures()
    with pytest.warns(TrackingWarning, match="server refused"):
        Tracker(cfg.logger, memo).start(cfg, _run_dir(tmp_path, "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        second = Tracker(cfg.logger, memo)
        second.start(cfg, _run_dir(tmp_path, "b"))
        second.log_row(ROW)
        second.finish()
    assert calls == ["a"]
    other_project = run_config("model=var_tiny", "eval=smoke", "logger=wandb", "logger.project=other")
    with pytest.warns(TrackingWarning):
        Tracker(other_project.logger, memo).start(other_project, _run_dir(tmp_path, "c"))
    assert calls == ["a", "c"]


def test_tables_cli_logs_tables_with_published_rows_plots_and_report(offline, tmp_path):
    from tests.test_tables import FIXTURE_PUBLISHED, write_row
    from varq.tables import main

    runs, published = tmp_path / "runs", tmp_path / "published.csv"
    write_row(runs, "fp", quant="fp16", bits="fp16", calib="none", inception_score=280.0, fid=3.5)
    write_row(runs, "ours4", inception_score=95.0, fid=23.0, fid2fp16=22.0)
    published.write_text(FIXTURE_PUBLISHED, encoding="utf-8")
    out = tmp_path / "tables"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        assert main(["--root", str(runs), "--out", str(out), "--published", str(published), "--wandb"]) == 0
    (run,) = offline_runs(out / "wandb")
    logged = {k for h in run.history for k in h if k.startswith("tables/")}
    written = {p.stem for p in out.glob("*.csv") if p.stem not in ("rows", "cells")}
    assert logged == {f"tables/{name}" for name in written} and "tables/shift_and_sum_class_cond_var_d16" in logged
    (main_table,) = run.tables("tables/shift_and_sum_class_cond_var_d16")
    source = main_table["columns"].index("source")
    assert sorted({r[source] for r in main_table["data"]}) == ["paper", "varq"]
    bits, fid = main_table["columns"].index("bits"), main_table["columns"].index("var_d16/fid")
    paper_fp = [r[fid] for r in main_table["data"] if r[source] == "paper" and r[bits] == "fp16"]
    assert paper_fp == [3.41]  # the published FP row, with its number
    (rows,) = run.tables("rows")
    assert sorted(r[rows["columns"].index("run_id")] for r in rows["data"]) == ["fp", "ours4"]
    assert any(k.startswith("plots/") for h in run.history for k in h)
    assert len(run.media("images")) == len(list((out / "plots").glob("*.png"))) > 0
    assert run.media("html") and "<table>" in run.media("html")[0].read_text()


def test_artifacts_only_when_asked(offline, run_config, tmp_path):
    run_dir = _run_dir(tmp_path)
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "batch_0.npz").write_bytes(b"shard")
    state = run_dir / "quantizer_state.pt"
    state.write_bytes(b"state")
    for artifacts, expected in (("[]", []), ("[quantizer_state,samples]",
                                             [("quantizer_state", ["quantizer_state.pt"]),
                                              ("samples", ["batch_0.npz"])])):
        cfg = run_config("model=var_tiny", "eval=smoke", "logger=wandb", f"logger.artifacts={artifacts}",
                         f"paths.root={tmp_path}/runs_{len(expected)}")
        tracker = Tracker(cfg.logger)
        tracker.start(cfg, run_dir)
        tracker.log_artifacts(run_dir, state, run_dir / "samples")
        tracker.finish()
        (run,) = offline_runs(tmp_path / f"runs_{len(expected)}" / "wandb")
        assert [(kind, files) for kind, _, files in run.artifacts] == expected


def test_an_fp8_run_is_tagged_with_its_backend(run_config):
    from varq.tracking import group_and_tags

    _, fake_tags = group_and_tags(run_config("model=var_tiny", "quant=rtn", "bits=w4a4"))
    _, fp8_tags = group_and_tags(run_config("model=var_tiny", "quant=rtn", "bits=w4a4", "backend=fp8"))
    assert "backend:fp8" in fp8_tags and not any(t.startswith("backend:") for t in fake_tags)
    assert [t for t in fp8_tags if t != "backend:fp8"] == fake_tags
