"""Sweep workflow of varq.run: sweep presets need -m, --cfg shows what runs, each point reports, the sweep ends
with its comparison table (varq.callbacks)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from tests.test_tables import write_row
from varq.callbacks import POINT_FILE, SweepSummary, point_line, summarize_sweep, sweep_only_error

REPO = Path(__file__).resolve().parents[1]


def varq_run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "varq.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_sweep_preset_without_multirun_is_refused_before_anything_is_written(tmp_path):
    proc = varq_run("+experiment=digits", f"paths.root={tmp_path}/runs", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "+experiment=digits is a sweep" in proc.stderr and "-m" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cfg_job_shows_the_budget_that_runs(tmp_path, monkeypatch, capsys):
    from varq.run import cli

    monkeypatch.chdir(tmp_path)

    def shown(*overrides: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["varq-run", "--cfg", "job", *overrides])
        cli()
        return yaml.safe_load(capsys.readouterr().out)

    digits = shown()
    assert (digits["quant"]["iters"], digits["quant"]["lr"]) == (300, 0.0015)  # var_digits' budget, not 5000
    d16 = shown("model=var_d16", "quant=brecq")
    assert (d16["quant"]["iters"], d16["quant"]["lr"]) == (5000, 1e-4)  # the paper's, where the model sets none
    assert shown("quant.iters=40")["quant"]["iters"] == 40
    assert digits["paths"]["cache"] == "runs/cache"  # interpolations resolved
    assert digits["calib"]["dgc"]["atol"] == 1e-3  # dataclass defaults the YAML does not list
    assert shown("quant=brecq", "-p", "quant")["iters"] == 300  # one package, as Hydra's -p
    monkeypatch.setattr(sys, "argv", ["varq-run", "--cfg", "hydra"])  # Hydra's own view of its node
    cli()
    assert "${paths.root}/hydra/" in yaml.safe_load(capsys.readouterr().out)["hydra"]["run"]["dir"]
    assert not (tmp_path / "runs").exists()


def test_cfg_job_config_errors_exit_2(tmp_path, monkeypatch, capsys):
    from varq.run import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["varq-run", "--cfg", "job", "eval.batch_size=many"])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 2 and "eval" in capsys.readouterr().err


def test_the_shown_config_is_the_one_that_runs(run_config, tmp_path):
    from varq.showcfg import effective_config

    overrides = [f"paths.root={tmp_path}/runs", f"paths.cache={tmp_path}/cache", "quant=brecq", "bits=w6a6"]
    assert effective_config(overrides) == json.loads(json.dumps(dataclasses.asdict(run_config("quant=brecq",
                                                                                               "bits=w6a6"))))
    assert effective_config([*overrides, "+shard=1"]) == effective_config(overrides)  # shard selects work only


def test_sweep_only_error_names_the_preset_and_its_axes():
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"bits": "w8a8,w4a4"}},
                                      "runtime": {"choices": {"experiment": "table1"}}}})
    assert "+experiment=table1 is a sweep (bits=w8a8,w4a4)" in sweep_only_error(cfg)
    assert sweep_only_error(OmegaConf.create({"hydra": {"sweeper": {"params": {}}}})) is None


def test_point_line():
    row = {"model": "var_digits", "quant": "ours", "bits": "w4a4", "calib": "resample", "task": "class_cond",
           "inception_score": 8.123, "fid": 45.906, "fid2fp16": None, "class_accuracy": 0.9, "run_id": "ab12",
           "time_calibrate_s": 60.5, "time_generate_s": 30.0, "time_metrics_s": None}
    assert point_line(3, row) == ("[varq] point 3 done: var_digits ours w4a4 calib=resample → IS 8.12, FID 45.91, "
                                  "acc 0.900 (ab12, 1m30s)")


def _job_config(tmp_path: Path, num: int):
    from hydra.types import RunMode

    return OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num},
                                       "runtime": {"output_dir": str(tmp_path / "sweep" / str(num))}}})


def test_each_finished_point_prints_a_line_and_names_its_run_dirs(tmp_path, capsys):
    from tests.conftest import compose_cfg
    from varq.compose import to_run_config
    from varq.pipeline import fp16_config, run_paths

    task_cfg = compose_cfg([f"paths.root={tmp_path}/runs", "model=var_tiny", "quant=rtn"])
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    ret = JobReturn(cfg=task_cfg, status=JobStatus.COMPLETED)
    ret.return_value = {"run_id": "x1", "model": "var_tiny", "quant": "rtn", "bits": "w4a4", "calib": "none",
                        "fid": 1.5}
    SweepSummary().on_job_end(_job_config(tmp_path, 0), ret)
    assert "[varq] point 0 done: var_tiny rtn w4a4 → FID 1.50 (x1)" in capsys.readouterr().out
    point = json.loads((tmp_path / "sweep" / "0" / POINT_FILE).read_text())
    cfg = to_run_config(task_cfg)
    assert point["run_dirs"] == [str(run_paths(fp16_config(cfg)).run_dir), str(run_paths(cfg).run_dir)]

    failed = JobReturn(cfg=task_cfg, status=JobStatus.FAILED)
    failed.return_value = FloatingPointError("loss became nan")
    (tmp_path / "sweep" / "1").mkdir(parents=True)
    SweepSummary().on_job_end(_job_config(tmp_path, 1), failed)
    assert "[varq] point 1 failed: FloatingPointError: loss became nan" in capsys.readouterr().out
    assert not (tmp_path / "sweep" / "1" / POINT_FILE).exists()


def test_summary_tabulates_only_the_sweeps_points_per_protocol(tmp_path, capsys):
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    smoke = dict(model="var_tiny", calib="none", n_samples=8)
    rows = {
        "fp": write_row(runs, "fp", quant="fp16", bits="fp16", fid=3.0, **smoke),
        "q": write_row(runs, "q", quant="rtn", fid=7.5, **smoke),
        "big": write_row(runs, "big", quant="rtn", fid=99.0, **{**smoke, "n_samples": 100}),  # another protocol
    }
    write_row(runs, "other", model="var_tiny", quant="brecq", fid=1.0, n_samples=8)  # not a point of this sweep
    for num, names in enumerate((["fp", "q"], ["big"])):
        (sweep / str(num)).mkdir(parents=True)
        dirs = [str(rows[n].parent) for n in names]
        (sweep / str(num) / POINT_FILE).write_text(json.dumps({"run_dirs": dirs}))
    written = summarize_sweep(sweep, published=None)
    out = capsys.readouterr().out
    assert "[varq] sweep summary: 3 runs" in out
    assert "brecq" not in out  # a row outside the sweep stays out
    tables = {p.name: p.read_text() for p in written if p.name.startswith("shift_and_sum_") and p.suffix == ".md"}
    assert len(tables) == 2  # n=8 and n=100 are two protocols: two tables, never one
    (with_fp16,) = [t for t in tables.values() if "7.50" in t]
    assert "+4.50" in with_fp16 and "99.00" not in with_fp16  # Δ against the FP16 row of the same protocol
    assert sweep / "summary" / "report.html" in written


@pytest.mark.slow
def test_two_point_wandb_offline_sweep(tmp_path):
    """The whole loop: two reconstruction points with W&B offline → a point line each, the summary table, and per
    point an offline W&B run with its rows table, both grids, group/tags and the reconstruction loss series."""
    from tests.wandb_offline import offline_runs

    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # conftest disables W&B; this test writes
    env["VARQ_PROGRESS"] = "lines"
    proc = varq_run("-m", "model=var_tiny", "eval=smoke", "quant=brecq", "bits=w8a8,w4a4", "logger=wandb",
                    f"paths.root={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "Warning" not in proc.stdout
    assert proc.stdout.count("[varq] point ") == 2
    assert "[varq] sweep summary: 3 runs" in proc.stdout and "| W4A4 | brecq | varq |" in proc.stdout
    assert list((tmp_path / "sweep" / "summary").glob("shift_and_sum_class_cond*.md"))
    runs = offline_runs(tmp_path / "runs" / "wandb")
    assert len(runs) == 2
    for run, bits in zip(runs, ("w8a8", "w4a4")):
        assert run.group == "var_tiny/smoke/class_cond"
        assert {"quant:brecq", f"bits:{bits}", "calib:distinct", "model:var_tiny", "seed:0"} <= set(run.tags)
        (table,) = run.tables("rows")
        assert [r[table["columns"].index("bits")] for r in table["data"]] == ["fp16", bits]
        (samples,) = run.series("samples")
        assert samples["captions"] == ["fp16 fp16", f"brecq {bits}"]
        losses = run.series("reconstruct/loss")
        assert len(losses) == 9 and all(isinstance(v, float) for v in losses)  # one per unit of the tiny VAR
        assert run.summary["stage"] == "done" and run.exit_code == 0


def test_wandb_sweep_definition_gives_valid_runs(run_config):
    """Every value of the W&B sweep composes into a valid run, as the agent passes them (key=value overrides)."""
    sweep = yaml.safe_load((REPO / "sweeps" / "wandb_digits.yaml").read_text())
    assert sweep["command"][-1] == "${args_no_hyphens}" and "-m" in sweep["command"]
    params = sweep["parameters"]
    fixed = {k: v["value"] for k, v in params.items() if "value" in v}
    grid = {k: v["values"] for k, v in params.items() if "values" in v}
    assert "fp16" not in grid["quant"]  # the reference is one run (step 1), not one per bit-width
    base = [f"{k}={v}" for k, v in fixed.items() if k != "paths.root"]  # run_config puts paths under tmp_path
    for key, values in grid.items():
        others = [f"{k}={v[0]}" for k, v in grid.items() if k != key]
        for value in values:
            cfg = run_config(*base, *others, f"{key}={value}")
            assert {"quant": cfg.quant_name, "bits": cfg.bits.name}[key] == value
            assert cfg.logger.name == "wandb" and cfg.logger.mode == "online"


def test_points_run_elsewhere_are_reported_at_the_end(tmp_path, capsys):
    """submitit jobs print their line into their own logs; the launching process repeats what it did not see."""
    sweep = tmp_path / "sweep"
    for num, fid in (("0", 2.0), ("1", 4.0)):
        (sweep / num).mkdir(parents=True)
        row = {"run_id": f"r{num}", "model": "var_tiny", "quant": "rtn", "bits": "w4a4", "fid": fid}
        (sweep / num / POINT_FILE).write_text(json.dumps({"run_dirs": [], "row": row}))
    callback = SweepSummary()
    callback.reported.add("0")  # as if point 0 had run in this process
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    out = capsys.readouterr().out
    assert "[varq] point 1 done: var_tiny rtn w4a4 → FID 4.00 (r1)" in out and "point 0" not in out
    assert "nothing to tabulate" in out
