"""varq.progress: bars on a terminal, plain lines in logs, events for listeners; and the stage hooks that use it."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

from varq.progress import Progress, ProgressEvent, format_duration, listening, track


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_log_handlers(monkeypatch):
    # lines go to the stream unless logging is configured (pytest's caplog handler would take them)
    monkeypatch.setattr(logging.getLogger("varq.progress"), "hasHandlers", lambda: False)


def test_duration_format():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 + 125)] == ["0s", "59s", "1m01s", "1h02m05s"]


def test_lines_every_interval_with_eta_from_the_recent_rate(no_log_handlers):
    clock, out = Clock(), io.StringIO()
    p = Progress("generate", total=20, run="fp16_fp16_abc", unit="batch", stream=out, mode="lines",
                 interval_s=30, clock=clock)
    for _ in range(10):  # a resumed stage: ten finished shards are skipped at once
        p.update(1)
    assert out.getvalue() == ""  # nothing before the first interval
    clock.now += 30
    p.update(1)  # 11 done after 30 s
    clock.now += 30
    p.update(1, loss=0.125)  # 1 batch in the last 30 s → 8 left × 30 s
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "generate fp16_fp16_abc: 11/20 batch (55%), 30s, ETA 25s"  # 9 left at 11 per 30 s
    assert lines[1] == "generate fp16_fp16_abc: 12/20 batch (60%), 1m00s, ETA 4m00s, loss=0.125"
    assert lines[2] == "generate fp16_fp16_abc: 12/20 batch (60%), done in 1m00s, loss=0.125"
    assert len(lines) == 3


def test_lines_go_to_the_log_when_logging_is_configured(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="varq.progress"):
        with Progress("features", total=2, stream=out, mode="lines", interval_s=0) as p:
            p.update(2)
    assert out.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["features: 2/2 it (100%)"] * 2


def test_bar_on_a_terminal():
    out = Tty()
    with Progress("reconstruct", total=4, unit="stage", stream=out) as p:
        assert p.mode == "bar"
        for _ in range(4):
            p.update(1, loss=0.5)
    text = out.getvalue()
    assert "reconstruct" in text and "4/4" in text and "loss=0.5" in text and "\r" in text


def test_listeners_get_events_only_inside_their_block_and_cannot_break_a_stage(caplog):
    seen: list[ProgressEvent] = []

    def broken(event):
        raise RuntimeError("dashboard down")

    with listening(seen.append), listening(broken):
        for _ in track([1, 2, 3], "generate", run="r", mode="off"):
            pass
    for _ in track([1], "generate", mode="off"):  # outside: nobody listens
        pass
    assert [(e.done, e.total, e.finished) for e in seen] == [(1, 3, False), (2, 3, False), (3, 3, False),
                                                               (3, 3, True)]
    assert all(e.run == "r" and e.stage == "generate" for e in seen)
    assert "dashboard down" in caplog.text


def test_a_stage_that_raises_reports_failed():
    seen: list[ProgressEvent] = []
    with listening(seen.append), pytest.raises(ValueError):
        with Progress("generate", total=3, mode="off") as p:
            p.update(1)
            raise ValueError("nan")
    assert seen[-1].finished and seen[-1].failed and seen[-1].done == 1


def test_generation_and_features_report_progress(run_config):
    from varq import pipeline

    cfg = run_config("model=var_tiny", "eval=smoke", "device=cpu", "quant=fp16")
    seen: list[ProgressEvent] = []
    with listening(seen.append):
        result = pipeline.run(cfg)
    done = [e for e in seen if e.stage == "generate" and e.finished]
    assert len(done) == 1 and done[0].run == result.paths.run_dir.name
    assert done[0].done == done[0].total == len(list(result.paths.samples_dir.glob("batch_*.npz")))

    from varq.metrics.fidelity import compute_features

    seen.clear()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    with listening(seen.append):
        compute_features(images, batch_size=2)
    assert [(e.done, e.total) for e in seen if e.stage == "features"] == [(1, 3), (2, 3), (3, 3), (3, 3)]


def test_reconstruction_reports_every_unit_loss():
    from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
    from varq.calib import CalibSet
    from varq.config import BitsConfig
    from varq.quant.methods.brecq import Brecq, BrecqConfig

    var, vqvae = tiny_var(), tiny_vqvae()
    label_N, x_NLC, idx = random_teacher_batch(vqvae, B=4, seed=5)
    calib = CalibSet(labels_N=label_N, seeds_N=torch.zeros(4, dtype=torch.long), idx_per_scale=idx,
                     teacher_input_NLC=x_NLC, num_classes=var.num_classes, cfg=1.5)
    method = Brecq(BrecqConfig(iters=2, batch_size=4))
    seen: list[ProgressEvent] = []
    with listening(seen.append):
        method.calibrate(copy.deepcopy(var), calib, BitsConfig("w4a4", 4, 4))
    units = method.stats["units"]
    reported = [e.values for e in seen if e.stage == "reconstruct" and "loss" in e.values]
    assert [v["unit"] for v in reported] == [u["name"] for u in units]
    assert [v["loss"] for v in reported] == [u["loss_after"] for u in units]
    assert all(v["iters"] == 2 for v in reported)
    assert seen[-1].stage == "reconstruct" and seen[-1].finished and seen[-1].done == seen[-1].total
    # inside each unit, its iterations and loss as it fits (here 2 iterations: one update at the end)
    inner = [e for e in seen if e.stage == "adaround" and not e.finished]
    assert len(inner) == len(units) and all(e.done == 2 == e.total and e.values["loss"] >= 0 for e in inner)

