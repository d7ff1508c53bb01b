"""Sweeps through the real SLURM launcher on a single-node cluster started by scripts/slurm-local.sh.

Run with ``pytest -m slurm`` (as root: the script installs packages and starts daemons). Outside CI a cluster that
cannot be started skips these tests with the script's output as the reason; with ``CI`` set it fails them.
Every job uses the random-weight ``var_tiny`` model on the CPU, so a sweep point takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from varq.quant.registry import available_methods

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
STATE_DIR = Path(os.environ.get("VARQ_SLURM_DIR", "/tmp/varq-slurm"))
PARTITION = os.environ.get("VARQ_SLURM_PARTITION", "local")
SWEEP_TIMEOUT_S = 300


@dataclass
class Cluster:
    partition: str
    env: dict[str, str]  # environment for clients: SLURM_CONF, one thread per job, W&B quiet


def _job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "WANDB_"))}
    env.update(SLURM_CONF=str(STATE_DIR / "slurm.conf"), OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    env = {**os.environ, "VARQ_SLURM_DIR": str(STATE_DIR), "VARQ_SLURM_PARTITION": PARTITION}
    was_running = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
        reason = None if started.returncode == 0 else f"exit {started.returncode}:\n{started.stderr[-4000:]}"
    except (OSError, subprocess.TimeoutExpired) as err:
        reason = f"{type(err).__name__}: {err}"
    if reason is not None:
        message = f"scripts/slurm-local.sh start failed ({reason})"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield Cluster(partition=PARTITION, env=_job_env())
    if not was_running:  # leave a cluster that someone else started (e.g. `make test-slurm`) running
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def varq_command(cluster: Cluster, root: Path, *overrides: str, paths: bool = True) -> list[str]:
    """``python -m varq.run -m`` through hydra/launcher=slurm, sized for the 2-CPU test node.

    timeout_min=10 keeps submitit's USR2 (signal_delay_s=120, up to 60 s early) far away from these short jobs.
    """
    return [
        sys.executable, "-m", "varq.run", "-m", "hydra/launcher=slurm",
        f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
        "model=var_tiny", "eval=smoke", "device=cpu",
        *([f"paths.root={root}/runs", f"paths.cache={root}/cache"] if paths else []),
        *overrides,
    ]


def run_varq(cluster: Cluster, cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or cluster.env, capture_output=True, text=True,
                          timeout=SWEEP_TIMEOUT_S)


def slurm(cluster: Cluster, *args: str) -> str:
    return subprocess.run(list(args), env=cluster.env, capture_output=True, text=True, check=True, timeout=30).stdout


def rows_under(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/*/row.json"))}


# --- a 2x2 sweep as one job array ----------------------------------------------------------------------------

def sweep_axes() -> list[str]:
    # four distinct runs; with a quantized method its FP16 references are the fp16 points of the same sweep
    if "rtn" in available_methods():
        return ["quant=rtn,fp16", "eval.seed=0,1", "bits=w8a8", "eval.metrics=[fid2fp16]"]
    return ["quant=fp16", "eval.seed=0,1", "eval.cfg=1.0,1.5"]


@pytest.fixture(scope="module")
def sweep_2x2(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep2x2")
    t0 = time.monotonic()
    proc = run_varq(slurm_cluster, varq_command(slurm_cluster, root, *sweep_axes()))
    return root, proc, time.monotonic() - t0


def test_sweep_runs_as_a_slurm_job_array(sweep_2x2):
    root, proc, seconds = sweep_2x2
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Submitit 'slurm' sweep output dir" in proc.stderr + proc.stdout
    rows = rows_under(root)
    assert len(rows) == 4, sorted(map(str, rows))
    results = list(root.glob("runs/hydra/multirun/*/.submitit/*/*_result.pkl"))
    assert len(results) == 4  # four array tasks, each finished and returned its result through submitit
    if "rtn" in available_methods():
        by_quant = {(r["quant"], r["seed"]): r for r in rows.values()}
        assert set(by_quant) == {("rtn", 0), ("rtn", 1), ("fp16", 0), ("fp16", 1)}
        # the quantized runs were compared with the shared FP16 samples: exactly two fp16 run dirs exist
        assert all(isinstance(by_quant[("rtn", s)]["fid2fp16"], float) for s in (0, 1))
        assert len(list(root.glob("runs/var_tiny/fp16_*"))) == 2
    print(f"2x2 SLURM sweep: {seconds:.1f} s")


def test_rerun_skips_done_work_and_logs_to_wandb_offline(slurm_cluster, sweep_2x2):
    root, first, _ = sweep_2x2
    assert first.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in rows_under(root)}
    proc = run_varq(slurm_cluster, varq_command(slurm_cluster, root, *sweep_axes(), "logger=wandb",
                                                "logger.group=slurm-test"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in rows_under(root)} == before  # nothing recomputed, rows untouched
    runs = sorted((root / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 4, runs
    for run in runs:
        (blob_file,) = run.glob("run-*.wandb")
        blob = blob_file.read_bytes()
        for name in (b"n_samples", b"time_generate_s", b"slurm-test"):
            assert name in blob, (name, blob_file)
    if "rtn" in available_methods():
        assert sum(b"fid2fp16" in next(r.glob("run-*.wandb")).read_bytes() for r in runs) >= 2


# --- a job killed in the middle of generation -------------------------------------------------------------------

def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"varq exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_requeued_job_resumes_generation_without_duplicates(slurm_cluster, tmp_path, run_config):
    from varq import pipeline
    from varq.sample.layout import plan_batches
    from varq.sample.shards import read_shard

    # 8 classes x 150 samples, one per batch: 1,200 batch files, ~15 s of generation on one CPU
    overrides = ["eval.samples_per_class=150", "eval.batch_size=1"]
    cfg = run_config("model=var_tiny", "eval=smoke", "device=cpu", *overrides)  # same paths as the job (tmp_path)
    plan = plan_batches(cfg.eval, cfg.model.num_classes)
    samples_dir = pipeline.run_paths(cfg).samples_dir
    name = f"varq-requeue-{uuid.uuid4().hex[:8]}"
    cmd = varq_command(slurm_cluster, tmp_path, *overrides, f"hydra.launcher.name={name}")
    log_path = tmp_path / "varq.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_cluster.env, stdout=log, stderr=subprocess.STDOUT)
    job = None
    try:
        job = _wait(lambda: slurm(slurm_cluster, "squeue", "-h", "-n", name, "-o", "%i").split(), 60, "the job",
                    proc)[0]
        count = lambda: len(list(samples_dir.glob("batch_*.npz")))  # noqa: E731
        _wait(lambda: count() >= 50, 120, "the first 50 batches", proc)
        done_at_requeue, t_requeue = count(), time.time()
        slurm(slurm_cluster, "scontrol", "requeue", job)  # kills the running job and puts it back in the queue
        deadline, killed_mid_write = time.monotonic() + SWEEP_TIMEOUT_S, None
        while proc.poll() is None and time.monotonic() < deadline:
            # Slurm holds a requeued job for ~120 s (Reason=BeginTime); release it at once
            if "BeginTime" in slurm(slurm_cluster, "squeue", "-h", "-j", job, "-o", "%r"):
                if killed_mid_write is None:  # the killed job is gone: did it leave a half-written temporary?
                    killed_mid_write = [p.name for p in samples_dir.glob(".*.tmp")]
                slurm(slurm_cluster, "scontrol", "update", f"jobid={job}", "StartTime=now")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job:
                subprocess.run(["scancel", job], env=slurm_cluster.env, capture_output=True)
    output = log_path.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert done_at_requeue < len(plan), "the job finished before it could be killed mid-way"

    states = slurm(slurm_cluster, "sacct", "-j", job, "-D", "-X", "-n", "-P", "-o", "State").split()
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states

    # every sample exactly once: one checksummed file per planned batch, labels as planned, nothing else left over
    files = sorted(samples_dir.iterdir())
    leftovers = [f.name for f in files if not f.name.startswith("batch_")]
    assert not leftovers, f"temporaries of a writer killed mid-write were left behind: {leftovers}"
    assert [f.name for f in files] == [f"batch_{p.index:06d}.npz" for p in plan]
    for p, f in zip(plan, files):
        read_shard(f, p.labels)
    row = json.loads(pipeline.run_paths(cfg).row.read_text())
    assert row["n_samples"] == sum(len(p.labels) for p in plan)
    # resumed, not restarted: the batches finished before the kill were kept, not rewritten
    kept = sum(f.stat().st_mtime < t_requeue for f in files)
    assert kept >= done_at_requeue
    print(f"requeue: {done_at_requeue}/{len(plan)} batches before the kill, {kept} kept, "
          f"temporaries left by the kill: {killed_mid_write}")


# --- clear errors ------------------------------------------------------------------------------------------------

def test_unreachable_controller_surfaces_sbatch_error(slurm_cluster, tmp_path):
    conf = (STATE_DIR / "slurm.conf").read_text().replace("SlurmctldPort=6817", "SlurmctldPort=6999")
    (tmp_path / "slurm.conf").write_text(conf)
    env = {**slurm_cluster.env, "SLURM_CONF": str(tmp_path / "slurm.conf")}
    proc = run_varq(slurm_cluster, varq_command(slurm_cluster, tmp_path), env=env)
    assert proc.returncode != 0
    assert "sbatch: error" in proc.stderr and "Unable to contact slurm controller" in proc.stderr, proc.stderr[-3000:]


def test_invalid_partition_surfaces_sbatch_error(slurm_cluster, tmp_path):
    cmd = varq_command(slurm_cluster, tmp_path) + ["hydra.launcher.partition=no_such_partition"]
    proc = run_varq(slurm_cluster, cmd)
    assert proc.returncode != 0
    assert "invalid partition specified: no_such_partition" in proc.stderr, proc.stderr[-3000:]


def test_unwritable_output_dir_names_paths_root(slurm_cluster, tmp_path):
    # /proc refuses new folders even to root (a chmod 500 folder would not stop root); the sweep's own folder is
    # writable, so the job itself runs on the cluster and the pipeline's error comes back through submitit
    cmd = varq_command(slurm_cluster, tmp_path, "paths.root=/proc/varq/runs", "paths.cache=/proc/varq/cache",
                       f"hydra.sweep.dir={tmp_path}/sweep", paths=False)
    proc = run_varq(slurm_cluster, cmd)
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "/proc/varq" in proc.stderr and "paths.root" in proc.stderr, \
        proc.stderr[-3000:]
