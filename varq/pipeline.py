"""The only place the stages are wired: build → calibrate → generate → metrics → row.

Every stage leaves an artifact in the run directory and is skipped when that artifact is complete, so a killed or
requeued job resumes where it stopped. The FP16 samples a quantized run is compared against are produced by the
FP16 run of the same model and protocol, once (under a file lock), and shared by every run of a sweep.

The stages are public functions; ``run_single`` composes them, and so do the shard jobs (``varq.scaleout``) and
the figure tools, so there is one way to build, quantize, generate and read a run:

- ``run_paths(cfg)`` / ``RunPaths``: where a run's artifacts live; ``check_writable(folder)``;
- ``build_model(cfg, device)``: the FP model and its tokenizer;
- ``quantize(cfg, var, vqvae, paths, device, timings)``: calibrate (or load the saved quantizer state), then put the
  quantized Linears on the run's backend (``apply_backend``);
- ``generate_samples(cfg, task, var, vqvae, paths, device, shard=None)`` and ``samples_ready(cfg, task, paths)``;
- ``load_run_samples(cfg, task=None)``: a finished run's images and labels;
- ``compute_metrics(cfg, task, images, labels, reference, device)``; ``build_row(cfg, metrics, timings, …)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from varq.atomic import quarantine, read_json_dict, read_or_heal, save_torch_atomic, write_json_atomic
from varq.compose import calib_label, fp16_config
from varq.config import DEFAULT_BACKEND, ConfigError, RunConfig
from varq.identity import calib_id, model_identity, protocol_id, quant_id, run_id
from varq.locks import held
from varq.metrics.fidelity import cached_stats
from varq.quant.fused import use_fused_quantizers
from varq.results import provenance
from varq.rows import METHOD_PREFIX, METRIC_COLUMNS, RESULT_ROW, STAGES
from varq.sample.batches import GenerationTask
from varq.sample.generate import generate_to_dir, load_samples, samples_complete
from varq.sample.tasks import build_task

__all__ = [
    "RunPaths", "RunResult", "Timings", "apply_backend", "build_model", "build_row", "check_backend", "check_writable",
    "compute_metrics", "fp16_config", "fp16_stats_path", "generate_samples", "load_run_samples", "quantize",
    "resolve_device", "run", "run_paths", "run_single", "samples_ready",
]

log = logging.getLogger(__name__)


@dataclass
class RunPaths:
    run_dir: Path
    samples_dir: Path

    @property
    def row(self) -> Path:
        return self.run_dir / "row.json"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.json"

    @property
    def timings(self) -> Path:
        return self.run_dir / "timings.json"

    @property
    def quantizer_state(self) -> Path:
        return self.run_dir / "quantizer_state.pt"

    @property
    def quant_report(self) -> Path:
        return self.run_dir / "quant_report.json"

    @property
    def grid(self) -> Path:
        return self.run_dir / "grid.png"


@dataclass
class RunResult:
    row: dict[str, Any]
    paths: RunPaths
    reference: RunResult | None = None
    stages_run: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} requested but CUDA is not available; use device=cpu or device=auto")
    return device


def run_paths(cfg: RunConfig) -> RunPaths:
    rid = run_id(cfg)
    backend = "" if cfg.backend == DEFAULT_BACKEND else f"_{cfg.backend}"  # the id differs too; this is for people
    run_dir = Path(cfg.paths.root) / cfg.model.name / f"{cfg.quant_name}_{cfg.bits_label}{backend}_{rid}"
    return RunPaths(run_dir=run_dir, samples_dir=run_dir / "samples")


class Timings:
    """Stage wall times, persisted and summed over attempts: a stage that was killed and resumed reports the time
    of every attempt, so ``time_generate_s`` of a requeued 50k run is what it really cost."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, float] = read_json_dict(path) or {}

    def record(self, stage: str, seconds: float) -> None:
        key = f"time_{stage}_s"
        self.values[key] = round(self.values.get(key, 0.0) + seconds, 3)
        write_json_atomic(self.path, self.values)

    @contextmanager
    def stage(self, stage: str, stages: list[str] | None = None) -> Iterator[None]:
        """Time a stage; an attempt that fails or is interrupted still adds what it spent."""
        t0 = time.perf_counter()
        try:
            yield
            if stages is not None:
                stages.append(stage)
        finally:
            self.record(stage, time.perf_counter() - t0)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, or fail naming the paths to set."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # one probe name per process: jobs of a sweep probe the shared lock folder at the same moment
        probe = folder / f".varq_write_probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")  # a probe, not an artifact: removed at once
        probe.unlink()
    except OSError as err:
        raise RuntimeError(
            f"output folder {folder} is not writable ({err}); set paths.root (and paths.cache) to writable folders"
        ) from None


def fp16_stats_path(cfg: RunConfig) -> Path:
    """Where a sweep keeps the FP16 reference's features statistics (extracted once, shared by every run)."""
    return run_paths(fp16_config(cfg)).run_dir / f"feature_stats_{cfg.model.feature_extractor}.npz"


def check_backend(cfg: RunConfig) -> None:
    """A run the backend cannot serve is refused before any file is written (also when the pipeline is called
    without the command line's validation)."""
    if cfg.backend == DEFAULT_BACKEND:
        return
    from varq.validate import check_backend as validate_backend

    validate_backend(cfg)


def run(cfg: RunConfig) -> RunResult:
    """Run one grid point (and, for a quantized run, its shared FP16 reference first)."""
    check_backend(cfg)
    reference = None
    if cfg.quant_name != "fp16":
        # The reference's samples are needed only while its feature statistics are not cached (or were damaged):
        # then a reference whose row survived but whose shards did not is healed now, before this run generates.
        need = "fid2fp16" in cfg.eval.metrics and cached_stats(fp16_stats_path(cfg)) is None
        reference = _run_locked(fp16_config(cfg), need_samples=need)
    # Exact, so not part of any identity: the compiled quantizers give the eager ones' numbers (varq.quant.fused)
    previous = use_fused_quantizers(cfg.eval.fused_quantizers)
    try:
        result = _run_locked(cfg, reference)
    finally:
        use_fused_quantizers(previous)
    result.reference = reference
    return result


def _run_locked(cfg: RunConfig, reference: RunResult | None = None, need_samples: bool = False) -> RunResult:
    """One job per run directory at a time: the FP16 reference shared by a sweep, an fp16 point listed at several
    bit-widths, a sweep relaunched while the first is still running all wait for each other instead of writing the
    same files. Locks are never nested (a quantized run releases the reference's lock before taking its own)."""
    lock_dir = Path(cfg.paths.cache) / "locks"
    check_writable(lock_dir)
    rid = run_id(cfg)
    with held(lock_dir / f"{cfg.quant_name}_{rid}.lock", f"run {cfg.quant_name}_{cfg.bits_label}_{rid}"):
        return run_single(cfg, reference, need_samples=need_samples)


def _row_is_current(row: dict, cfg: RunConfig) -> bool:
    """A finished row counts only if it is this run's and holds every requested metric (a row written before a
    metric was asked for, or by an older varq, is rebuilt from what is on disk instead of being returned)."""
    return (row.get("run_id") == run_id(cfg) and "protocol_id" in row
            and set(cfg.eval.metrics) <= set(row.get("metrics_requested", ())))


def run_single(cfg: RunConfig, reference: RunResult | None = None, need_samples: bool = False) -> RunResult:
    paths = run_paths(cfg)
    check_writable(paths.run_dir)
    task = build_task(cfg)  # class_cond, t2i, or inpaint/outpaint/edit with their input images and masks
    row = read_json_dict(paths.row)
    if row is not None and _row_is_current(row, cfg):
        if not need_samples or samples_ready(cfg, task, paths):
            log.info("run %s is complete, nothing to do", paths.run_dir)
            return RunResult(row=row, paths=paths)
        log.warning("run %s has its row but lost samples that other runs compare against: regenerating them",
                    paths.run_dir)
    write_json_atomic(paths.run_dir / "config.json", dataclasses.asdict(cfg))
    timings = Timings(paths.timings)
    device = resolve_device(cfg.device)
    stages: list[str] = []

    if not samples_ready(cfg, task, paths):
        with timings.stage("build", stages):
            var, vqvae = build_model(cfg, device)
        var = quantize(cfg, var, vqvae, paths, device, timings, stages)
        with timings.stage("generate", stages):
            generate_samples(cfg, task, var, vqvae, paths, device)

    images, labels = load_samples(cfg.eval, cfg.model.num_classes, paths.samples_dir, task=task)
    if not paths.grid.is_file():
        from varq.results.grid import save_grid, spread_indices

        # spread over the class-major sample set, so the grid shows every class rather than the first one
        save_grid(images[spread_indices(len(images), cfg.eval.grid_images)], paths.grid)

    metrics = read_json_dict(paths.metrics)
    if metrics is None or not all(m in metrics for m in cfg.eval.metrics):
        with timings.stage("metrics", stages):
            metrics = compute_metrics(cfg, task, images, labels, reference, device)
            write_json_atomic(paths.metrics, metrics)

    row = build_row(cfg, metrics, timings.values, len(images), device, read_json_dict(paths.quant_report))
    write_json_atomic(paths.row, row)
    return RunResult(row=row, paths=paths, stages_run=stages)


# ---------------------------------------------------------------------------------------------------- stages
def build_model(cfg: RunConfig, device: torch.device) -> tuple[Any, Any]:
    """The FP model (eval mode) and its tokenizer, as ``cfg.model`` describes them. A text-to-image model runs the
    protocol's scale schedule from here on: quantizers and calibration read the scale structure once."""
    from varq.models.factory import build_models

    model, tokenizer = build_models(cfg.model, device)
    if cfg.model.family == "infinity":
        from varq.sample.t2i import schedule_of

        model.set_schedule(schedule_of(cfg.eval))
    return model, tokenizer


def quantize(cfg: RunConfig, var, vqvae, paths: RunPaths, device: torch.device, timings: Timings,
             stages: list[str] | None = None):
    """The model this run samples from: the method applied to ``var``, on the run's backend. A saved quantizer state
    is loaded instead of recalibrating (a resumed run, or a shard job after the first); a state that does not fit is
    moved aside and the method calibrates again. Calibration is timed as the ``calibrate`` stage and its state
    saved. The saved state is always the fake-quantized model's: the backend is applied after it, so a state serves
    every backend and a resumed fp8 run swaps the same layers again."""
    return apply_backend(cfg, _fake_quantized(cfg, var, vqvae, paths, device, timings, stages))


def apply_backend(cfg: RunConfig, qvar):
    """``qvar`` (fake-quantized) with its quantized Linears on ``cfg.backend``: unchanged for ``fake``; for ``fp8``
    every quantized Linear becomes an FP8 GEMM (`varq.quant.fp8`), and one that does not fit is an error naming it."""
    if cfg.backend == DEFAULT_BACKEND:
        return qvar
    if cfg.backend != "fp8":
        raise ConfigError(f"backend={cfg.backend!r} is invalid: choose fake or fp8")
    from varq.quant.fp8 import apply_fp8_backend

    swapped = apply_fp8_backend(qvar, cfg.bits.w_bits, cfg.bits.a_bits, strict=True)
    if not swapped:
        raise ConfigError(f"backend=fp8: quant={cfg.quant_name} left no quantized Linear to run on it; use backend=fake")
    log.info("backend=fp8: %d Linears run as FP8 GEMMs", len(swapped))
    return qvar


def _fake_quantized(cfg: RunConfig, var, vqvae, paths: RunPaths, device: torch.device, timings: Timings,
                    stages: list[str] | None = None):
    from varq.quant.registry import get_method

    method = get_method(cfg.quant_name)(cfg.quant)
    if not method.needs_calibration:
        return method.calibrate(var, None, cfg.bits)
    state = read_or_heal(paths.quantizer_state,
                         lambda p: torch.load(p, map_location=device, weights_only=True))
    if state is not None:
        # sampling is re-run without recalibrating: the saved state rebuilds the same fake-quantized model
        try:
            qvar = method.load_quantizer_state(var, state, cfg.bits)
        except Exception as err:  # a state of another model or varq version: recalibrate rather than crash
            quarantine(paths.quantizer_state, f"does not fit this model: {type(err).__name__}: {str(err)[:200]}")
            var, vqvae = build_model(cfg, device)  # the failed load may have half-swapped the modules
        else:
            _write_method_report(method, qvar, paths)
            return qvar
    from varq.calib import build_calibration_set

    with timings.stage("calibrate", stages):
        calib_set = build_calibration_set(cfg, var, vqvae, device)
        method.attach_sampler(vqvae, cfg.eval)
        qvar = method.calibrate(var, calib_set, cfg.bits)
        save_torch_atomic(paths.quantizer_state, method.quantizer_state(qvar))
    _write_method_report(method, qvar, paths)
    return qvar


def _write_method_report(method, qvar, paths: RunPaths) -> None:
    """Method-specific scalars (e.g. ours: θ and the extra BitOPs fraction) that go into the row as quant_*."""
    values = {k: v for k, v in method.report(qvar).items() if isinstance(v, (int, float, str, bool)) or v is None}
    if values:  # on resume some methods only know what the state holds: keep the calibration-time report
        write_json_atomic(paths.quant_report, values)


def samples_ready(cfg: RunConfig, task: GenerationTask, paths: RunPaths) -> bool:
    """Every batch of the task's plan is on disk, complete and checksummed."""
    return samples_complete(cfg.eval, cfg.model.num_classes, paths.samples_dir, task=task)


def generate_samples(cfg: RunConfig, task: GenerationTask, var, vqvae, paths: RunPaths, device: torch.device,
                     shard: int | None = None) -> int:
    """Make the missing batches (of shard ``shard`` only, when given); returns how many were made."""
    return generate_to_dir(var, vqvae, cfg.eval, cfg.model.num_classes, paths.samples_dir, device, shard=shard,
                           task=task)


def load_run_samples(cfg: RunConfig, task: GenerationTask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's samples in plan order (uint8 N×3×H×W, labels N); raises if a batch is missing or damaged."""
    task = task if task is not None else build_task(cfg)
    return load_samples(cfg.eval, cfg.model.num_classes, run_paths(cfg).samples_dir, task=task)


def compute_metrics(cfg: RunConfig, task: GenerationTask, images, labels, reference: RunResult | None,
                    device) -> dict[str, Any]:
    """IS, FID, FID2FP16 and (digits) class accuracy. FID is against the task's real images (the model's reference
    statistics for class_cond, the input images themselves for editing tasks); for ``edit`` the labels are the
    target classes, so its class_accuracy is the accuracy on the target class."""
    wanted = set(cfg.eval.metrics)
    if not wanted:
        return {}
    from varq.metrics.fidelity import cached_feature_stats, evaluate

    ref_stats = task.reference_stats(cfg.eval, Path(cfg.paths.cache) / "reference", device)
    fp16_stats = None
    if reference is not None and "fid2fp16" in wanted:
        extractor = cfg.model.feature_extractor
        fp16_stats = cached_feature_stats(
            fp16_stats_path(cfg),
            lambda: load_samples(cfg.eval, cfg.model.num_classes, reference.paths.samples_dir, task=task)[0],
            extractor, device, inception_weights=cfg.eval.inception_weights,
        )
    clip = None
    if task.name == "t2i":
        if "clip_score" in wanted:
            from varq.metrics.clip_score import clip_score

            clip = clip_score(images, [task.prompts[int(i)] for i in labels], cfg.eval.clip_weights, device)
        labels = None  # prompt indices, not classes: no class accuracy
    values = evaluate(
        images, labels, extractor=cfg.model.feature_extractor, reference=ref_stats, fp16_samples=fp16_stats,
        device=device, isc_splits=min(10, max(1, len(images) // 100)), inception_weights=cfg.eval.inception_weights,
        metrics=cfg.eval.metrics,
    )
    if "clip_score" in wanted:
        values["clip_score"] = clip  # None: no CLIP weights given (logged), or not a text-to-image run
    return {k: v for k, v in values.items() if k in wanted or k.startswith(tuple(wanted))}


def build_row(cfg: RunConfig, metrics: dict, timings: dict, n_samples: int, device: torch.device,
              method_report: dict | None = None) -> dict[str, Any]:
    """The run's row (``varq.rows.RESULT_ROW``): refused before it is written if a column is missing or mistyped."""
    calib = calib_label(cfg)
    calibrated = calib != "none"
    row = {
        "run_id": run_id(cfg),
        "model": cfg.model.name,
        "quant": cfg.quant_name,
        "bits": cfg.bits_label,
        "calib": calib,
        "backend": cfg.backend,
        "task": "t2i" if cfg.model.family != "var" else cfg.task.name,  # a text-to-image model's only task
        "n_samples": n_samples,
        "seed": cfg.eval.seed,
        "eval": cfg.eval.name,
        "cfg": cfg.eval.cfg,
        "top_k": cfg.eval.top_k,
        "top_p": cfg.eval.top_p,
        "model_id": json.dumps(model_identity(cfg), sort_keys=True),
        # what tables group by: rows of one protocol are comparable; seeds are the repeat axis inside a cell
        "protocol_id": protocol_id(cfg),
        "quant_id": quant_id(cfg),
        "calib_id": calib_id(cfg),
        "calib_seed": cfg.calib.seed if calibrated else None,
        "calib_n_images": cfg.calib.n_images if calibrated else None,
        "w_bits": None if cfg.quant_name == "fp16" else cfg.bits.w_bits,
        "a_bits": None if cfg.quant_name == "fp16" else cfg.bits.a_bits,
        "metrics_requested": list(cfg.eval.metrics),
    }
    for key in METRIC_COLUMNS:
        row[key] = metrics.get(key)
    for stage in STAGES:
        row[f"time_{stage}_s"] = timings.get(f"time_{stage}_s")
    row.update(provenance(device, cfg.eval.dtype))
    row.update({f"{METHOD_PREFIX}{k}": v for k, v in (method_report or {}).items()})
    return RESULT_ROW.build(row)
