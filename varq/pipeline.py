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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from varq.config import RunConfig, model_identity, run_id
from varq.results import provenance, write_json_atomic
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


class _Timings:
    """Stage wall times, persisted so a resumed run still reports what each stage cost when it ran."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.values[f"time_{stage}_s"] = round(seconds, 3)
        write_json_atomic(self.path, self.values)


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


def run(cfg: RunConfig) -> RunResult:
    """Run one grid point (and, for a quantized run, its shared FP16 reference first)."""
    reference = _run_locked(fp16_config(cfg)) if cfg.quant_name != "fp16" else None
    result = _run_locked(cfg, reference)
    result.reference = reference
    return result


def _run_locked(cfg: RunConfig, reference: RunResult | None = None) -> RunResult:
    """One job per run directory at a time: the FP16 reference shared by a sweep, an fp16 point listed at several
    bit-widths, a sweep relaunched while the first is still running all wait for each other instead of writing the
    same files. Locks are never nested (a quantized run releases the reference's lock before taking its own)."""
    lock_dir = Path(cfg.paths.cache) / "locks"
    _check_writable(lock_dir)
    with FileLock(str(lock_dir / f"{cfg.quant_name}_{run_id(cfg)}.lock")):
        return run_single(cfg, reference)


def run_single(cfg: RunConfig, reference: RunResult | None = None) -> RunResult:
    paths = run_paths(cfg)
    _check_writable(paths.run_dir)
    if paths.row.is_file():
        log.info("run %s is complete, nothing to do", paths.run_dir)
        return RunResult(row=json.loads(paths.row.read_text()), paths=paths)
    write_json_atomic(paths.run_dir / "config.json", dataclasses.asdict(cfg))
    timings = _Timings(paths.timings)
    device = resolve_device(cfg.device)
    stages: list[str] = []

    num_classes = cfg.model.num_classes
    task = build_task(cfg)  # None for class_cond; inpaint/outpaint/edit bring their input images and masks
    var = vqvae = None
    if not samples_complete(cfg.eval, num_classes, paths.samples_dir, task=task):
        from varq.models.factory import build_models

        t0 = time.perf_counter()
        var, vqvae = build_models(cfg.model, device)
        timings.record("build", time.perf_counter() - t0)
        stages.append("build")
        var = _quantize(cfg, var, vqvae, paths, timings, device, stages)
        t0 = time.perf_counter()
        generate_to_dir(var, vqvae, cfg.eval, num_classes, paths.samples_dir, device, task=task)
        timings.record("generate", time.perf_counter() - t0)
        stages.append("generate")

    images, labels = load_samples(cfg.eval, num_classes, paths.samples_dir, task=task)
    if not paths.grid.is_file():
        from varq.results.grid import save_grid, spread_indices

        # spread over the class-major sample set, so the grid shows every class rather than the first one
        save_grid(images[spread_indices(len(images), cfg.eval.grid_images)], paths.grid)

    if paths.metrics.is_file():
        metrics = json.loads(paths.metrics.read_text())
    else:
        t0 = time.perf_counter()
        metrics = _metrics(cfg, images, labels, reference, device, task)
        write_json_atomic(paths.metrics, metrics)
        timings.record("metrics", time.perf_counter() - t0)
        stages.append("metrics")

    row = _row(cfg, metrics, timings.values, len(images), device)
    if paths.quant_report.is_file():
        row.update({f"quant_{k}": v for k, v in json.loads(paths.quant_report.read_text()).items()})
    write_json_atomic(paths.row, row)
    return RunResult(row=row, paths=paths, stages_run=stages)


def _quantize(cfg, var, vqvae, paths: RunPaths, timings: _Timings, device, stages: list[str]):
    from varq.quant.registry import get_method

    method = get_method(cfg.quant_name)(cfg.quant)
    if not method.needs_calibration:
        return method.calibrate(var, None, cfg.bits)
    if paths.quantizer_state.is_file():
        # sampling is re-run without recalibrating: the saved state rebuilds the same fake-quantized model
        state = torch.load(paths.quantizer_state, map_location=device, weights_only=True)
        qvar = method.load_quantizer_state(var, state, cfg.bits)
        _write_method_report(method, qvar, paths)
        return qvar
    from varq.calib import build_calibration_set

    t0 = time.perf_counter()
    calib_set = build_calibration_set(cfg, var, vqvae, device)
    method.attach_sampler(vqvae, cfg.eval)
    qvar = method.calibrate(var, calib_set, cfg.bits)
    tmp = paths.quantizer_state.with_suffix(".tmp")
    torch.save(method.quantizer_state(qvar), tmp)
    tmp.replace(paths.quantizer_state)
    timings.record("calibrate", time.perf_counter() - t0)
    stages.append("calibrate")
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
            reference.paths.run_dir / f"feature_stats_{extractor}.npz",
            lambda: load_samples(cfg.eval, cfg.model.num_classes, reference.paths.samples_dir, task=task)[0],
            extractor, device, inception_weights=cfg.eval.inception_weights,
        )
    values = evaluate(
        images, labels, extractor=cfg.model.feature_extractor, reference=ref_stats, fp16_samples=fp16_stats,
        device=device, isc_splits=min(10, max(1, len(images) // 100)), inception_weights=cfg.eval.inception_weights,
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
    }
    for key in ("inception_score", "fid", "fid2fp16", "class_accuracy"):
        row[key] = metrics.get(key)
    for stage in ("build", "calibrate", "generate", "metrics"):
        row[f"time_{stage}_s"] = timings.get(f"time_{stage}_s")
    row.update(provenance(device, cfg.eval.dtype))
    return row
