"""Experiment tracking (Weights & Biases), in one place and strictly optional.

The run directory is the source of truth: ``row.json``, ``metrics.json``, ``timings.json`` and the grid are written
by the pipeline whatever happens here. Tracking mirrors them, so every W&B problem (package missing, no network,
no login, a full disk) becomes a warning and never costs a result.

What a W&B run holds (one per sweep point):

- **config**: the resolved varq config, the run id and directory, and the row's settings (n_samples, seed, cfg,
  provenance), so the runs table can filter and group by them; settings never go to history.
- **group and tags** from the config: group ``<model>/<eval>/<task>`` (one protocol: its runs are comparable),
  tags ``model:…``, ``quant:…``, ``bits:…``, ``backend:…`` (fp8 runs only), ``calib:…``, ``seed:…`` plus
  ``logger.tags``.
- **live, while the pipeline runs**: ``stage`` in the summary (the last stage that reported, so a crashed run shows
  where it died, with ``status``), the reconstruction loss of every unit as a history series
  (``reconstruct/loss``), generation / feature progress, and ``time/<stage>_s`` as each stage ends. Stages of the
  shared FP16 reference carry an ``fp16/`` prefix.
- **at the end**: metrics and stage times in the summary (``fp16/…`` for the reference), the FP16 and the
  quantized grid side by side under ``samples``, the two rows as the ``rows`` table, and the artifacts named in
  ``logger.artifacts`` (``quantizer_state``, ``samples``).

``logger=none`` does nothing and never imports wandb. ``logger=wandb`` logs offline unless ``logger.mode=online``
(upload later with ``wandb sync <paths.root>/wandb/offline-run-*``); files go to ``<paths.root>/wandb/``, never the
working directory. The W&B run id is the varq run id, so re-running a finished sweep point updates its W&B run
instead of adding a duplicate (except under a W&B sweep agent, which assigns ids itself; there the resolved config is
logged under the ``varq`` key). `log_tables` logs ``varq.tables`` output (``python -m varq.tables --wandb``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from varq.compose import calib_label
from varq.config import ConfigError, LoggerConfig, RunConfig
from varq.identity import run_id
from varq.progress import ProgressEvent, listening
from varq.rows import RESULT_ROW

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
ARTIFACTS = ("quantizer_state", "samples")
INIT_TIMEOUT_S = 90  # online mode: give up on an unreachable server instead of holding a GPU job hostage
FP16_PREFIX = "fp16/"
# Row columns that describe how a run was made rather than what it measured: config, never history or summary
# (what it measured: the metric, time and method columns).
SETTING_KEYS = RESULT_ROW.names("key", "identity", "protocol", "provenance")


class TrackingWarning(RuntimeWarning):
    """W&B failed; the run's results on disk are unaffected."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as plain JSON types, exactly as ``row.json`` reads back.

    A freshly computed row holds e.g. ``torch.__version__`` (a ``TorchVersion``, a str subclass) where a row read
    from disk holds ``str``; a W&B table types its columns by the first row and refuses the other kind.
    """
    return json.loads(json.dumps(dict(row), default=str))


def group_and_tags(cfg: RunConfig, extra_tags: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Default W&B group (one protocol per group) and the tags of a sweep point."""
    group = f"{cfg.model.name}/{cfg.eval.name}/{cfg.task.name}"
    tags = [f"model:{cfg.model.name}", f"quant:{cfg.quant_name}", f"bits:{cfg.bits_label}",
            f"calib:{calib_label(cfg)}", f"seed:{cfg.eval.seed}", *extra_tags]
    if cfg.backend != "fake":  # only away from the default, like the run id: a fake run's tags stay as they were
        tags.insert(3, f"backend:{cfg.backend}")
    return group, [tag[:64] for tag in dict.fromkeys(tags)]  # W&B refuses tags over 64 characters


class InitFailures:
    """W&B inits that failed in this process, by (mode, project, entity).

    Hydra's basic launcher runs every sweep point in one process: when the server refused the first point it
    refuses the next, and each retry would cost up to INIT_TIMEOUT_S and a warning. One instance lives for the
    process (`PROCESS_INIT_FAILURES`); tests pass their own.
    """

    def __init__(self) -> None:
        self.reasons: dict[tuple[str, str, str | None], str] = {}


PROCESS_INIT_FAILURES = InitFailures()


class Tracker:
    """``start`` → progress events (`on_progress`) → ``log_row`` → ``log_artifacts`` → ``finish`` (or ``fail``)."""

    def __init__(self, logger: LoggerConfig, init_failures: InitFailures | None = None):
        self.logger = logger
        if logger.name not in ("none", "wandb"):
            raise ConfigError(f"logger={logger.name!r}; choose none or wandb")
        if logger.mode not in MODES:
            raise ConfigError(f"logger.mode={logger.mode!r}; choose one of {', '.join(MODES)}")
        unknown = sorted(set(logger.artifacts) - set(ARTIFACTS))
        if unknown:
            raise ConfigError(f"logger.artifacts has {unknown}; choose from {list(ARTIFACTS)} (or [])")
        self.enabled = logger.name == "wandb" and logger.mode != "disabled"
        self.init_failures = PROCESS_INIT_FAILURES if init_failures is None else init_failures
        self.started = False
        self._wandb: Any = None
        self._run: Any = None
        self._run_name: str | None = None
        self._stage: str | None = None
        self._where = "the run directory"

    @property
    def active(self) -> bool:
        return self._run is not None

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

    def _init_key(self) -> tuple[str, str, str | None]:
        return (self.logger.mode, self.logger.project, self.logger.entity)

    def start(self, cfg: RunConfig, run_dir: Path) -> None:
        """Open the W&B run before the pipeline starts, so a crashed run is visible with its last stage."""
        if not self.enabled or self.started:
            return
        self.started = True
        run_dir = Path(run_dir)
        self._where, self._run_name = str(run_dir), run_dir.name
        earlier = self.init_failures.reasons.get(self._init_key())
        if earlier is not None:
            log.info("W&B init failed earlier in this process (%s); tracking stays off", earlier)
            return
        try:
            import wandb

            self._wandb = wandb
            wandb_dir = Path(cfg.paths.root)  # wandb writes into "<dir>/wandb/"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            under_agent = "WANDB_SWEEP_ID" in os.environ
            config = plain({**dataclasses.asdict(cfg), "run_id": run_id(cfg), "run_dir": str(run_dir)})
            group, tags = group_and_tags(cfg, self.logger.tags)
            self._run = wandb.init(
                project=self.logger.project,
                entity=self.logger.entity,
                group=self.logger.group or group,
                tags=tags,
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
            self._run.summary.update({"stage": "started", "status": "running"})
        except Exception as err:
            self.init_failures.reasons[self._init_key()] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"W&B init failed ({type(err).__name__}: {err}); tracking is off for this run and the rest of this "
                f"process, results are safe in {self._where}",
                TrackingWarning,
                stacklevel=2,
            )
            self._run = None

    def on_progress(self, event: ProgressEvent) -> None:
        """Progress listener: live stage, per-unit reconstruction loss, stage wall time when a stage ends."""
        if self._run is None:
            return
        with self._guard("progress log"):
            prefix = FP16_PREFIX if event.run not in (None, self._run_name) else ""
            stage = f"{prefix}{event.stage}"
            if stage != self._stage:
                self._stage = stage
                self._run.summary.update({"stage": stage})
            if event.finished:
                self._run.summary.update({f"{prefix}time/{event.stage}_s": round(event.elapsed_s, 3)})
                return
            payload = {f"{stage}/{k}": v for k, v in event.values.items() if _is_number(v)}
            payload[f"{stage}/done"] = event.done
            self._run.log(payload)

    def log_row(
        self,
        row: Mapping[str, Any],
        grid_png_path: Path | None = None,
        timings: Mapping[str, float] | None = None,
        reference_row: Mapping[str, Any] | None = None,
        reference_grid_path: Path | None = None,
    ) -> None:
        """Settings to config; metrics and stage times to the summary; the two grids side by side; the rows table."""
        if self._run is None:
            return
        with self._guard("log"):
            wandb = self._wandb
            row = plain(row)
            reference = plain(reference_row) if reference_row is not None else None
            self._run.config.update({"row": {k: row[k] for k in SETTING_KEYS if k in row}}, allow_val_change=True)
            summary = {k: v for k, v in row.items() if k not in SETTING_KEYS and v is not None}
            summary.update({k: v for k, v in (timings or {}).items() if _is_number(v)})
            if reference is not None:
                summary.update({f"{FP16_PREFIX}{k}": v for k, v in reference.items()
                                if k not in SETTING_KEYS and _is_number(v)})
            summary.update({"stage": "done", "status": "finished"})
            self._run.summary.update(summary)
            images = []
            for path, the_row in ((reference_grid_path, reference), (grid_png_path, row)):
                if the_row is not None and path is not None and Path(path).is_file():
                    images.append(wandb.Image(str(path), caption=f"{the_row.get('quant')} {the_row.get('bits')}"))
            rows = ([reference] if reference is not None else []) + [row]
            columns = list(dict.fromkeys(k for r in rows for k in r))
            payload: dict[str, Any] = {"rows": wandb.Table(
                columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])}
            if images:
                payload["samples"] = images  # one panel: FP16 left, the quantized run right
            self._run.log(payload)

    def log_artifacts(self, run_dir: Path, quantizer_state: Path | None, samples_dir: Path | None) -> None:
        """The artifacts asked for in ``logger.artifacts`` (large: off by default)."""
        if self._run is None or not self.logger.artifacts:
            return
        with self._guard("artifact upload"):
            wandb = self._wandb
            name = Path(run_dir).name
            if "quantizer_state" in self.logger.artifacts and quantizer_state is not None and quantizer_state.is_file():
                artifact = wandb.Artifact(f"quantizer-{name}", type="quantizer_state")
                artifact.add_file(str(quantizer_state))
                self._run.log_artifact(artifact)
            if "samples" in self.logger.artifacts and samples_dir is not None and samples_dir.is_dir():
                artifact = wandb.Artifact(f"samples-{name}", type="samples")
                artifact.add_dir(str(samples_dir))
                self._run.log_artifact(artifact)

    def fail(self, err: BaseException) -> None:
        """Close the run as failed, keeping the last stage in its summary."""
        if self._run is None:
            return
        with self._guard("failure report"):
            self._run.summary.update({"status": f"failed: {type(err).__name__}: {err}"[:500]})
        self.finish(exit_code=1)

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        with self._guard("finish"):
            self._run.finish(exit_code=exit_code)
            # finish() returns before wandb-core has flushed the run file; teardown waits for it. Without it a
            # SLURM job's exit (which kills the step's leftover processes) can leave an empty offline run.
            self._wandb.teardown()
        self._run = None


def _cell(value: Any) -> Any:
    # a table column holds one type; None stays None, anything nested becomes text
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def run_tracked(tracker: Tracker, cfg: RunConfig, run: Callable[[RunConfig], Any]) -> Any:
    """``run(cfg)`` (the pipeline) with the W&B run open from the start and listening to progress.

    An exception closes the W&B run as failed (stage and error in its summary) and propagates unchanged.
    """
    from varq.pipeline import run_paths

    tracker.start(cfg, run_paths(cfg).run_dir)
    try:
        with listening(tracker.on_progress):
            return run(cfg)
    except BaseException as err:
        tracker.fail(err)
        raise


def track_result(tracker: Tracker, cfg: RunConfig, result) -> None:
    """Mirror a pipeline RunResult (row, grids, stage times, FP16 reference row, artifacts) and close the run."""
    if not tracker.enabled:
        return
    timings: dict = {}
    with tracker._guard("reading timings"):
        if result.paths.timings.is_file():
            timings = json.loads(result.paths.timings.read_text())
    reference = result.reference
    tracker.start(cfg, result.paths.run_dir)  # no-op when run_tracked opened it already
    tracker.log_row(result.row, result.paths.grid, timings,
                    reference_row=reference.row if reference is not None else None,
                    reference_grid_path=reference.paths.grid if reference is not None else None)
    tracker.log_artifacts(result.paths.run_dir, result.paths.quantizer_state, result.paths.samples_dir)
    tracker.finish()


def log_tables(tables: Sequence[Any], rows: Any, written: Sequence[Path], out: Path, *, mode: str = "offline",
               project: str | None = None, entity: str | None = None) -> bool:
    """Log ``varq.tables`` output as one W&B run (job type ``tables``): every comparison table (published rows
    included) as a ``wandb.Table``, the selected rows, the plots and qualitative figures, and ``report.html``.

    Returns whether the run was written; failures only warn (the files under ``out`` are the result).
    """
    from varq.report.render import to_csv_frame

    if mode not in MODES:
        raise ConfigError(f"--wandb {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "disabled":
        return False
    try:
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT", "varq"), entity=entity, job_type="tables",
            dir=str(out), mode=mode, reinit="finish_previous",
            config={"tables": [t.name for t in tables], "n_rows": int(len(rows))},
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False,
                                    init_timeout=INIT_TIMEOUT_S),
        )
        payload: dict[str, Any] = {}
        for table in tables:
            payload[f"tables/{table.name}"] = _frame_table(wandb, to_csv_frame(table))
        if len(rows):
            payload["rows"] = _frame_table(wandb, rows)
        for path in written:
            if path.suffix == ".png":
                payload[f"{'figures' if path.name.startswith('qualitative') else 'plots'}/{path.stem}"] = \
                    wandb.Image(str(path), caption=path.stem)
            elif path.suffix == ".html":
                payload["report"] = wandb.Html(path.read_text(encoding="utf-8"))
        run.log(payload)
        run.finish()
        wandb.teardown()
        return True
    except Exception as err:
        warnings.warn(f"W&B logging of the tables failed ({type(err).__name__}: {err}); the files under {out} "
                      f"are complete", TrackingWarning, stacklevel=2)
        return False


def _frame_table(wandb: Any, frame: Any) -> Any:
    """A pandas frame as a wandb.Table with plain cells (NaN → None, timestamps and nested values → text)."""
    records = json.loads(frame.to_json(orient="records", date_format="iso", default_handler=str))
    columns = [str(c) for c in frame.columns]
    return wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in records])
