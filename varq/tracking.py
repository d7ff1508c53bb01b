"""Experiment tracking (Weights & Biases), in one place and strictly optional.

The run directory is the source of truth: ``row.json``, ``metrics.json``, ``timings.json`` and the grid are written
by the pipeline before anything here runs. Tracking only mirrors them, so every W&B problem (package missing,
no network, no login, a full disk) becomes a warning and never costs a result.

``logger=none`` does nothing and never imports wandb. ``logger=wandb`` logs offline unless ``logger.mode=online``
(upload later with ``wandb sync <paths.root>/wandb/offline-run-*``); files go to ``<paths.root>/wandb/``, never the
working directory. The W&B run id is the varq run id, so re-running a finished sweep point updates its W&B run
instead of adding a duplicate (except under a W&B sweep agent, which assigns ids itself; there the resolved config is
logged under the ``varq`` key).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from varq.config import ConfigError, LoggerConfig, RunConfig
from varq.identity import run_id

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
INIT_TIMEOUT_S = 90  # online mode: give up on an unreachable server instead of holding a GPU job hostage


class TrackingWarning(RuntimeWarning):
    """W&B failed; the run's results on disk are unaffected."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """``start(cfg, run_dir)`` → ``log_row(row, grid_png_path, timings)`` (any number) → ``finish()``."""

    def __init__(self, logger: LoggerConfig):
        self.logger = logger
        if logger.name not in ("none", "wandb"):
            raise ConfigError(f"logger={logger.name!r}; choose none or wandb")
        if logger.mode not in MODES:
            raise ConfigError(f"logger.mode={logger.mode!r}; choose one of {', '.join(MODES)}")
        self.enabled = logger.name == "wandb" and logger.mode != "disabled"
        self._wandb: Any = None
        self._run: Any = None
        self._rows: list[dict[str, Any]] = []
        self._where = "the run directory"

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # wandb raises many types (CommError, UsageError, OSError, ...): all mean "skip"
            warnings.warn(
                f"W&B {what} failed ({type(err).__name__}: {err}); tracking is off for this run, "
                f"its results are safe in {self._where}",
                TrackingWarning,
                stacklevel=3,
            )
            self._run = None

    def start(self, cfg: RunConfig, run_dir: Path) -> None:
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        self._where = str(run_dir)
        with self._guard("init"):
            import wandb

            self._wandb = wandb
            wandb_dir = Path(cfg.paths.root)  # wandb writes into "<dir>/wandb/"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            under_agent = "WANDB_SWEEP_ID" in os.environ
            config = {**dataclasses.asdict(cfg), "run_id": run_id(cfg), "run_dir": str(run_dir)}
            self._run = wandb.init(
                project=self.logger.project,
                entity=self.logger.entity,
                group=self.logger.group,
                tags=list(self.logger.tags),
                name=run_dir.name,
                id=None if under_agent else run_id(cfg),
                resume=None if under_agent else "allow",
                job_type="eval",
                dir=str(wandb_dir),
                mode=self.logger.mode,
                # under an agent the sweep owns the top-level keys (quant="rtn"); ours would clash, so nest them
                config={"varq": config} if under_agent else config,
                reinit="finish_previous",  # sequential sweep points in one process (Hydra's basic launcher)
                settings=wandb.Settings(
                    silent=True, console="off", x_disable_stats=True, save_code=False, init_timeout=INIT_TIMEOUT_S,
                ),
            )

    def log_row(
        self,
        row: Mapping[str, Any],
        grid_png_path: Path | None = None,
        timings: Mapping[str, float] | None = None,
        reference_row: Mapping[str, Any] | None = None,
    ) -> None:
        """Numbers of the row and the stage times as metrics, the whole row as summary and table, the grid."""
        if self._run is None:
            return
        with self._guard("log"):
            wandb = self._wandb
            payload: dict[str, Any] = {k: v for k, v in row.items() if _is_number(v)}
            payload.update({k: v for k, v in (timings or {}).items() if _is_number(v)})
            if reference_row is not None:
                payload.update({f"fp16/{k}": v for k, v in reference_row.items() if _is_number(v)})
            if grid_png_path is not None and Path(grid_png_path).is_file():
                payload["samples"] = wandb.Image(str(grid_png_path), caption=f"{row.get('quant')} {row.get('bits')}")
            self._run.log(payload)
            self._run.summary.update({k: v for k, v in row.items() if v is not None})
            self._rows.extend([dict(reference_row)] if reference_row is not None else [])
            self._rows.append(dict(row))

    def finish(self) -> None:
        if self._run is None:
            return
        with self._guard("finish"):
            if self._rows:
                columns = sorted({k for r in self._rows for k in r})
                table = self._wandb.Table(
                    columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in self._rows]
                )
                self._run.log({"rows": table})
            self._run.finish()
            # finish() returns before wandb-core has flushed the run file; teardown waits for it. Without it a
            # SLURM job's exit (which kills the step's leftover processes) can leave an empty offline run.
            self._wandb.teardown()
        self._run = None


def _cell(value: Any) -> Any:
    # a table column holds one type; None stays None, anything exotic becomes text
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def track_result(tracker: Tracker, cfg: RunConfig, result) -> None:
    """Mirror a pipeline RunResult (row, grid, stage times, FP16 reference row) through ``tracker``."""
    if not tracker.enabled:
        return
    timings: dict = {}
    with tracker._guard("reading timings"):
        if result.paths.timings.is_file():
            timings = json.loads(result.paths.timings.read_text())
    reference_row = result.reference.row if result.reference is not None else None
    tracker.start(cfg, result.paths.run_dir)
    tracker.log_row(result.row, result.paths.grid, timings, reference_row=reference_row)
    tracker.finish()
