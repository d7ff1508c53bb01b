"""Fan one run's generation out over several jobs (GPUs), then merge.

Generation is split into ``eval.num_shards`` deterministic shards (shard k owns batches b with b % num_shards == k,
``varq.sample.layout.shard_of``); each batch is its own atomically written, checksummed file, so shards never write
the same file and a killed shard job loses at most the batch it was writing. The merge is the ordinary pipeline:
it finds the samples complete, skips generation and computes metrics and the row.

Two ways to drive it:

* From the command line, with Hydra's launcher making the job array (one entry point, ``varq.run``)::

      python -m varq.run -m hydra/launcher=slurm quant=fp16,rtn bits=w4a4 eval.num_shards=4 +shard=0,1,2,3
      python -m varq.run -m hydra/launcher=slurm quant=rtn bits=w4a4 eval.num_shards=4      # merge: metrics + row

  (list quant=fp16 in the shard sweep so the FP16 reference's samples are fanned out too.)
* From Python, with any submitit executor (``generate_shards_with_submitit``), which waits for the shards and then
  runs the merge as one more job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from filelock import FileLock

from varq import pipeline
from varq.atomic import write_json_atomic
from varq.config import ConfigError, RunConfig
from varq.sample.layout import shard_of
from varq.sample.shards import shard_is_complete, shard_path
from varq.sample.tasks import build_task

log = logging.getLogger(__name__)


def _check_shard(cfg: RunConfig, shard: int) -> None:
    if cfg.task.name != "class_cond":
        raise ConfigError(f"sharded generation supports task=class_cond only (got task={cfg.task.name})")
    n = cfg.eval.num_shards
    if n < 1:
        raise ConfigError(f"eval.num_shards={n}; it must be ≥ 1")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < n:
        raise ConfigError(f"shard={shard!r} must be an integer in [0, eval.num_shards={n})")


def _build_quantized(cfg: RunConfig, paths: pipeline.RunPaths, device) -> tuple[Any, Any]:
    """The model this run samples from. Calibration happens once per run: the first shard job calibrates and saves
    the quantizer state under a lock; the others wait and load it (same path as a resumed pipeline run)."""
    var, vqvae = pipeline.build_model(cfg, device)
    with FileLock(str(paths.run_dir / ".quantize.lock")):
        var = pipeline.quantize(cfg, var, vqvae, paths, device, pipeline.Timings(paths.timings))
    return var, vqvae


def generate_shard(cfg: RunConfig, shard: int) -> int:
    """Generate the missing batches of shard ``shard`` of this run; returns how many batches were made."""
    _check_shard(cfg, shard)
    paths = pipeline.run_paths(cfg)
    pipeline.check_writable(paths.run_dir)
    if paths.row.is_file():
        log.info("run %s is complete, shard %d has nothing to do", paths.run_dir, shard)
        return 0
    task = build_task(cfg)
    plans = shard_of(task.plan(cfg.eval), cfg.eval.num_shards, shard)
    if all(shard_is_complete(shard_path(paths.samples_dir, p.index), p.labels, p.seed) for p in plans):
        return 0
    device = pipeline.resolve_device(cfg.device)
    t0 = time.perf_counter()
    var, vqvae = _build_quantized(cfg, paths, device)
    made = pipeline.generate_samples(cfg, task, var, vqvae, paths, device, shard=shard)
    # one file per shard: shard jobs never read-modify-write a shared file
    write_json_atomic(
        paths.run_dir / "shard_timings" / f"shard_{shard:04d}.json",
        {"shard": shard, "num_shards": cfg.eval.num_shards, "batches_made": made,
         "time_s": round(time.perf_counter() - t0, 3)},
    )
    log.info("shard %d/%d of %s: %d batches generated", shard, cfg.eval.num_shards, paths.run_dir, made)
    return made


def prepare_quantizer(cfg: RunConfig) -> None:
    """Calibrate (if the method needs it and no saved state exists) before the shard jobs start, so that they do
    not queue behind one another's lock while holding GPUs."""
    paths = pipeline.run_paths(cfg)
    pipeline.check_writable(paths.run_dir)
    if paths.row.is_file() or paths.quantizer_state.is_file():
        return
    _build_quantized(cfg, paths, pipeline.resolve_device(cfg.device))


def _needs_calibration(cfg: RunConfig) -> bool:
    from varq.quant.registry import get_method

    return bool(get_method(cfg.quant_name)(cfg.quant).needs_calibration)


def generate_shards_with_submitit(cfg: RunConfig, executor, merge: bool = True) -> pipeline.RunResult | None:
    """Run ``cfg``'s generation (and its FP16 reference's) as one submitit job array, then the merge as one job.

    ``executor`` is any submitit executor (``AutoExecutor(folder, cluster="slurm")`` with its parameters set,
    ``LocalExecutor``, ``DebugExecutor``). Blocks until done; a failed job raises submitit's error, which carries
    the job's traceback. Returns the merged RunResult (None with ``merge=False``).
    """
    _check_shard(cfg, 0)
    targets = [cfg] if cfg.quant_name == "fp16" else [pipeline.fp16_config(cfg), cfg]
    pending = [
        t for t in targets
        if not pipeline.run_paths(t).row.is_file()
        and not pipeline.samples_ready(t, build_task(t), pipeline.run_paths(t))
    ]
    to_prepare = [t for t in pending if _needs_calibration(t) and not pipeline.run_paths(t).quantizer_state.is_file()]
    if to_prepare:
        for job in executor.map_array(prepare_quantizer, to_prepare):
            job.result()
    cfgs = [t for t in pending for _ in range(t.eval.num_shards)]
    shards = [k for t in pending for k in range(t.eval.num_shards)]
    if cfgs:
        jobs = executor.map_array(generate_shard, cfgs, shards)
        made = [job.result() for job in jobs]
        log.info("%d shard jobs generated %d batches", len(jobs), sum(made))
    for t in pending:
        missing = _missing_batches(t)
        if missing:
            raise RuntimeError(f"after all shard jobs, {len(missing)} batches of {pipeline.run_paths(t).run_dir} "
                               f"are still missing or damaged (first: {missing[:5]})")
    if not merge:
        return None
    return executor.submit(pipeline.run, cfg).result()


def _missing_batches(cfg: RunConfig) -> list[int]:
    samples_dir = pipeline.run_paths(cfg).samples_dir
    return [p.index for p in build_task(cfg).plan(cfg.eval)
            if not shard_is_complete(shard_path(samples_dir, p.index), p.labels, p.seed)]

