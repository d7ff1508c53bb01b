"""Hydra callbacks of ``varq.run`` (wired in ``varq/conf/config.yaml`` under ``hydra.callbacks``).

- A single run of a sweep preset (``+experiment=table1`` without ``-m``) is refused: Hydra would silently run
  one point of the grid.
- Every finished sweep point prints one line (model, method, bits, calibration, metrics) and leaves
  ``varq_point.json`` in its Hydra job folder, naming its run directory and its FP16 reference's. With the submitit
  launchers that happens inside the job; the folder is what the launching process can read afterwards.
- When the multirun ends, the launching process reads those files, loads the rows with `varq.report.rows`, and
  prints and saves the sweep's comparison tables with `varq.tables` (which never puts rows of different protocols
  in one table) under ``<sweep dir>/summary/``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from varq.atomic import write_json_atomic
from varq.progress import format_duration
from varq.rows import RESULT_ROW, SUMMARY_METRICS

log = logging.getLogger(__name__)

POINT_FILE = "varq_point.json"
SUMMARY_DIR = "summary"
PUBLISHED_CSV = Path("results/published/published.csv")  # relative to the launch folder, as in varq.tables
# how the point line shows each summary metric of the row schema: (label, decimals)
POINT_FORMAT: dict[str, tuple[str, int]] = {"inception_score": ("IS", 2), "fid": ("FID", 2),
                                            "fid2fp16": ("FID2FP16", 2), "class_accuracy": ("acc", 3)}


def sweep_only_error(config: DictConfig) -> str | None:
    """Why this single run must not start, or None: a grid in ``hydra.sweeper.params`` runs only under ``-m``."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if not params:
        return None
    experiment = OmegaConf.select(config, "hydra.runtime.choices.experiment", default=None)
    what = f"+experiment={experiment}" if experiment else "this config"
    axes = ", ".join(f"{k}={v}" for k, v in params.items())
    again = " ".join(a for a in sys.argv[1:] if a not in ("-m", "--multirun"))
    return (f"{what} is a sweep ({axes}); without -m only one point would run. Add -m: "
            f"python -m varq.run -m {again}".rstrip())


def point_line(num: Any, row: dict[str, Any]) -> str:
    """One line per finished sweep point: what it was and what it measured."""
    what = " ".join(str(row.get(k, "?")) for k in ("model", "quant", "bits"))
    calib = row.get("calib")
    if calib not in (None, "none"):
        what += f" calib={calib}"
    if row.get("task") not in (None, "class_cond"):
        what += f" task={row['task']}"
    numbers = [f"{label} {row[key]:.{digits}f}" for key, (label, digits) in
               ((m, POINT_FORMAT.get(m, (m, 3))) for m in SUMMARY_METRICS) if isinstance(row.get(key), (int, float))]
    seconds = RESULT_ROW.total_time_s(row)
    took = f", {format_duration(seconds)}" if seconds else ""
    return f"[varq] point {num} done: {what} → {', '.join(numbers) or 'no metrics'} ({row.get('run_id', '?')}{took})"


class SweepSummary(Callback):
    """Refuses sweep presets without ``-m``, reports each point, and tabulates the sweep at its end."""

    def __init__(self, published: str | None = None) -> None:
        self.published = Path(published) if published else PUBLISHED_CSV
        self.reported: set[str] = set()  # points whose line this process printed (basic launcher: all of them)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        error = sweep_only_error(config)
        if error is not None:
            print(f"varq: error: {error}", file=sys.stderr)
            sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode", default=None) != RunMode.MULTIRUN:
            return
        num = OmegaConf.select(config, "hydra.job.num", default="?")
        if job_return.status != JobStatus.COMPLETED:
            err = job_return._return_value  # the exception; .return_value would re-raise it
            print(f"[varq] point {num} failed: {type(err).__name__}: {err}", flush=True)
            return
        row = job_return.return_value
        if not isinstance(row, dict) or "run_id" not in row:
            return  # a +shard=k job: generation only, no row
        print(point_line(num, row), flush=True)
        self.reported.add(str(num))
        try:
            run_dirs = _run_dirs(job_return.cfg)
        except Exception as err:  # the point finished; a summary problem must not fail it
            log.warning("sweep summary: cannot name the run directory of point %s (%s)", num, err)
            return
        out = Path(str(config.hydra.runtime.output_dir)) / POINT_FILE
        write_json_atomic(out, {"run_dirs": [str(d) for d in run_dirs], "row": row})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        # submitit jobs printed their line into .submitit/ logs; repeat it here, where the sweep was launched
        for path in sorted(sweep_dir.glob(f"*/{POINT_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
            if path.parent.name not in self.reported:
                try:
                    print(point_line(path.parent.name, json.loads(path.read_text())["row"]))
                except (OSError, ValueError, KeyError):
                    pass  # summarize_sweep names unreadable point files
        try:
            summarize_sweep(sweep_dir, self.published)
        except Exception as err:  # every row is on disk; the summary is a convenience
            log.warning("sweep summary failed (%s: %s); run python -m varq.tables --root %s", type(err).__name__,
                        err, sweep_dir)


def _run_dirs(task_cfg: DictConfig) -> list[Path]:
    from varq.compose import to_run_config
    from varq.pipeline import fp16_config, run_paths

    cfg = to_run_config(task_cfg)
    dirs = [run_paths(cfg).run_dir]
    if cfg.quant_name != "fp16":
        dirs.insert(0, run_paths(fp16_config(cfg)).run_dir)
    return dirs


def point_run_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories named by the sweep's finished points (FP16 references included), without repeats."""
    dirs: dict[str, None] = {}
    for path in sorted(Path(sweep_dir).glob(f"*/{POINT_FILE}")):
        try:
            dirs.update(dict.fromkeys(json.loads(path.read_text())["run_dirs"]))
        except (OSError, ValueError, KeyError) as err:
            log.warning("sweep summary: skipping unreadable %s (%s)", path, err)
    return [Path(d) for d in dirs]


def summarize_sweep(sweep_dir: Path, published: Path | None = PUBLISHED_CSV) -> list[Path]:
    """Print the sweep's comparison tables and write them (markdown, LaTeX, CSV, plots, report.html) under
    ``<sweep_dir>/summary/``; returns the files written. `varq.tables` keeps protocols apart (one table per task,
    model and protocol), so a sweep over two evaluation protocols gets two tables, never one mixed one."""
    from varq.report.published import load_published
    from varq.report.render import to_markdown
    from varq.report.rows import dedupe_runs, load_rows
    from varq.tables import Selection, build_tables, write_outputs

    rows = dedupe_runs(load_rows(point_run_dirs(sweep_dir)))
    if rows.empty:
        print(f"[varq] sweep {sweep_dir}: no finished point with a row; nothing to tabulate")
        return []
    paper = load_published(published if published is not None and published.is_file() else None)
    # published rows of models outside the sweep would only add paper-only tables
    selection = Selection(models=sorted(rows["model"].dropna().unique()))
    tables = build_tables(rows, paper, selection)
    out = sweep_dir / SUMMARY_DIR
    written = write_outputs(tables, rows, out, f"Sweep {sweep_dir}: {len(rows)} runs (FP16 references included).")
    print(f"\n[varq] sweep summary: {len(rows)} runs\n")
    for table in tables:
        if table.name.startswith("shift_and_sum_"):
            print(to_markdown(table))
    print(f"[varq] tables, plots and report.html in {out}")
    return written
