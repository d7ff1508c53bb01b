"""varq.tracking: W&B mirrors the run directory and can never cost a result."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from varq.config import ConfigError, LoggerConfig
from varq.tracking import Tracker, TrackingWarning, track_result

ROW = {"run_id": "abc", "model": "var_tiny", "quant": "fp16", "bits": "fp16", "fid": 12.5, "inception_score": 3.25,
       "class_accuracy": None, "n_samples": 8, "git_sha": "deadbee"}
TIMINGS = {"time_build_s": 0.1, "time_generate_s": 2.0}


@pytest.fixture
def offline(monkeypatch):
    # conftest disables W&B for the whole suite; these tests exercise the real offline writer
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


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

        def log(self, payload):
            raise RuntimeError("wandb-core went away")

        def finish(self):
            raise AssertionError("finish must not be called after a failed log")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    tracker = Tracker(cfg.logger)
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
