"""The only place the stages are wired: build → calibrate → generate → metrics → row.

Every stage leaves an artifact in the run directory and is skipped when that artifact is complete, so a killed or
requeued job resumes where it stopped. The FP16 samples a quantized run is compared against are produced by the
FP16 run of the same model and protocol, once (under a file lock), and shared by every run of a sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from varq.atomic import quarantine, read_json_dict, read_or_heal, save_torch_atomic, write_json_atomic
from varq.config import RunConfig
from varq.identity import calib_id, model_identity, protocol_id, quant_id, run_id
from varq.locks import held
from varq.metrics.fidelity import cached_stats
from varq.metrics.registry import METRICS
from varq.results import provenance
from varq.sample.generate import generate_to_dir, load_samples, samples_complete
from varq.sample.tasks import build_task

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
    run_dir = Path(cfg.paths.root) / cfg.model.name / f"{cfg.quant_name}_{cfg.bits_label}_{rid}"
    return RunPaths(run_dir=run_dir, samples_dir=run_dir / "samples")


def fp16_config(cfg: RunConfig) -> RunConfig:
    from varq.quant.registry import method_config_class

    return dataclasses.replace(cfg, quant=method_config_class("fp16")())


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



def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".varq_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RuntimeError(
            f"output folder {folder} is not writable ({err}); set paths.root (and paths.cache) to writable folders"
        ) from None


def fp16_stats_path(cfg: RunConfig) -> Path:
    """Where a sweep keeps the FP16 reference's features statistics (extracted once, shared by every run)."""
    return run_paths(fp16_config(cfg)).run_dir / f"feature_stats_{cfg.model.feature_extractor}.npz"


def run(cfg: RunConfig) -> RunResult:
    """Run one grid point (and, for a quantized run, its shared FP16 reference first)."""
    reference = None
    if cfg.quant_name != "fp16":
        # The reference's samples are needed only while its feature statistics are not cached (or were damaged):
        # then a reference whose row survived but whose shards did not is healed now, before this run generates.
        need = "fid2fp16" in cfg.eval.metrics and cached_stats(fp16_stats_path(cfg)) is None
        reference = _run_locked(fp16_config(cfg), need_samples=need)
    result = _run_locked(cfg, reference)
    result.reference = reference
    return result


def _run_locked(cfg: RunConfig, reference: RunResult | None = None, need_samples: bool = False) -> RunResult:
    """One job per run directory at a time: the FP16 reference shared by a sweep, an fp16 point listed at several
    bit-widths, a sweep relaunched while the first is still running all wait for each other instead of writing the
    same files. Locks are never nested (a quantized run releases the reference's lock before taking its own)."""
    lock_dir = Path(cfg.paths.cache) / "locks"
    _check_writable(lock_dir)
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
    _check_writable(paths.run_dir)
    num_classes = cfg.model.num_classes
    task = build_task(cfg)  # None for class_cond; inpaint/outpaint/edit bring their input images and masks
    row = read_json_dict(paths.row)
    if row is not None and _row_is_current(row, cfg):
        if not need_samples or samples_complete(cfg.eval, num_classes, paths.samples_dir, task=task):
            log.info("run %s is complete, nothing to do", paths.run_dir)
            return RunResult(row=row, paths=paths)
        log.warning("run %s has its row but lost samples that other runs compare against: regenerating them",
                    paths.run_dir)
    write_json_atomic(paths.run_dir / "config.json", dataclasses.asdict(cfg))
    timings = Timings(paths.timings)
    device = resolve_device(cfg.device)
    stages: list[str] = []

    var = vqvae = None
    if not samples_complete(cfg.eval, num_classes, paths.samples_dir, task=task):
        from varq.models.factory import build_models

        with timings.stage("build", stages):
            var, vqvae = build_models(cfg.model, device)
        var = _quantize(cfg, var, vqvae, paths, timings, device, stages)
        with timings.stage("generate", stages):
            generate_to_dir(var, vqvae, cfg.eval, num_classes, paths.samples_dir, device, task=task)

    images, labels = load_samples(cfg.eval, num_classes, paths.samples_dir, task=task)
    if not paths.grid.is_file():
        from varq.results.grid import save_grid, spread_indices

        # spread over the class-major sample set, so the grid shows every class rather than the first one
        save_grid(images[spread_indices(len(images), cfg.eval.grid_images)], paths.grid)

    metrics = read_json_dict(paths.metrics)
    if metrics is None or not all(m in metrics for m in cfg.eval.metrics):
        with timings.stage("metrics", stages):
            metrics = _metrics(cfg, images, labels, reference, device, task)
            write_json_atomic(paths.metrics, metrics)

    row = _row(cfg, metrics, timings.values, len(images), device)
    report = read_json_dict(paths.quant_report)
    if report is not None:
        row.update({f"quant_{k}": v for k, v in report.items()})
    write_json_atomic(paths.row, row)
    return RunResult(row=row, paths=paths, stages_run=stages)


def _quantize(cfg, var, vqvae, paths: RunPaths, timings: Timings, device, stages: list[str]):
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
            from varq.models.factory import build_models

            var, vqvae = build_models(cfg.model, device)  # the failed load may have half-swapped the modules
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
    report = getattr(method, "report", None)
    if report is not None:
        values = {k: v for k, v in report(qvar).items() if isinstance(v, (int, float, str, bool)) or v is None}
        if values:  # on resume some methods only know what the state holds: keep the calibration-time report
            write_json_atomic(paths.quant_report, values)


def _metrics(cfg: RunConfig, images, labels, reference: RunResult | None, device, task=None) -> dict[str, Any]:
    """IS, FID, FID2FP16 and (digits) class accuracy. For editing tasks FID is against the input images themselves
    and the labels are the target classes, so class_accuracy of ``edit`` is the accuracy on the target class."""
    wanted = set(cfg.eval.metrics)
    if not wanted:
        return {}
    from varq.metrics.fidelity import cached_feature_stats, evaluate, reference_stats

    if task is None:
        ref_stats = reference_stats(
            cfg.model.reference, cache_dir=Path(cfg.paths.cache) / "reference", npz_path=cfg.eval.reference_npz,
            device=device, image_size=cfg.model.image_size,
        )
    else:
        ref_stats = task.reference_stats(cfg.eval, cfg.model.feature_extractor, Path(cfg.paths.cache) / "reference",
                                         device, inception_weights=cfg.eval.inception_weights)
    fp16_stats = None
    if reference is not None and "fid2fp16" in wanted:
        extractor = cfg.model.feature_extractor
        fp16_stats = cached_feature_stats(
            fp16_stats_path(cfg),
            lambda: load_samples(cfg.eval, cfg.model.num_classes, reference.paths.samples_dir, task=task)[0],
            extractor, device, inception_weights=cfg.eval.inception_weights,
        )
    values = evaluate(
        images, labels, extractor=cfg.model.feature_extractor, reference=ref_stats, fp16_samples=fp16_stats,
        device=device, isc_splits=min(10, max(1, len(images) // 100)), inception_weights=cfg.eval.inception_weights,
        metrics=cfg.eval.metrics,
    )
    return {k: v for k, v in values.items() if k in wanted or k.startswith(tuple(wanted))}


def _row(cfg: RunConfig, metrics: dict, timings: dict, n_samples: int, device: torch.device) -> dict[str, Any]:
    row = {
        "run_id": run_id(cfg),
        "model": cfg.model.name,
        "quant": cfg.quant_name,
        "bits": cfg.bits_label,
        "calib": cfg.calib_label,
        "task": cfg.task.name,
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
        "calib_seed": cfg.calib.seed if cfg.calib_label != "none" else None,
        "calib_n_images": cfg.calib.n_images if cfg.calib_label != "none" else None,
        "w_bits": None if cfg.quant_name == "fp16" else cfg.bits.w_bits,
        "a_bits": None if cfg.quant_name == "fp16" else cfg.bits.a_bits,
        "metrics_requested": list(cfg.eval.metrics),
    }
    for key in METRICS:
        row[key] = metrics.get(key)
    for stage in ("build", "calibrate", "generate", "metrics"):
        row[f"time_{stage}_s"] = timings.get(f"time_{stage}_s")
    row.update(provenance(device, cfg.eval.dtype))
    return row
