"""Numbers a user can trust: strict inputs before anything is written, run identity over file contents, and state
that heals (moved aside and rebuilt) instead of crashing forever."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from varq import pipeline
from varq.atomic import ArtifactWriteError, atomic_write_bytes, read_json_dict
from varq.config import ConfigError
from varq.identity import file_sha256, run_id
from varq.locks import held
from varq.models.checkpoint import CheckpointError, load_checked
from varq.sample import generate as gen_module
from varq.validate import validate_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=var_tiny", "eval=smoke", "eval.classes=[0,1,2,3]", "eval.samples_per_class=2", "eval.batch_size=4",
        "eval.metrics=[fid,fid2fp16]", "calib=random", "calib.n_images=2", "calib.batch_size=2"]


# ---------------------------------------------------------------- bit-width labels


def test_overriding_the_numbers_relabels_the_run(run_config, count_batches):
    cfg = run_config(*TINY, "quant=rtn", "bits=w4a4", "bits.w_bits=8", "bits.a_bits=8")
    assert cfg.bits.name == "w8a8"
    result = pipeline.run(cfg)
    assert result.row["bits"] == "w8a8" and (result.row["w_bits"], result.row["a_bits"]) == (8, 8)
    assert "_w8a8_" in result.paths.run_dir.name
    assert run_id(cfg) == run_id(run_config(*TINY, "quant=rtn", "bits=w8a8"))


@pytest.mark.parametrize("overrides, needle", [
    (["bits.w_bits=3", "bits.a_bits=3"], "w3a3"),
    (["bits.name=w8a8"], "bits.name='w8a8' does not match"),
    (["bits=w4a4", "bits.w_bits=16"], "w16a4"),
])
def test_bits_label_that_is_not_what_runs_is_refused(run_config, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        run_config(*TINY, "quant=rtn", *overrides)


# ---------------------------------------------------------------- one validation pass


@pytest.mark.parametrize("override, key", [
    ("eval.samples_per_class=0", "eval.samples_per_class"),
    ("eval.samples_per_class=-5", "eval.samples_per_class"),
    ("eval.top_p=2", "eval.top_p"),
    ("eval.top_p=0", "eval.top_p"),
    ("eval.top_k=-5", "eval.top_k"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.dtype=fp8", "eval.dtype"),
    ("eval.decoder=turbo", "eval.decoder"),
    ("eval.classes=[42]", "eval.classes"),
    ("eval.classes=[1,1]", "eval.classes"),
    ("eval.metrics=[fidd]", "eval.metrics"),
    ("eval.num_shards=0", "eval.num_shards"),
    ("calib.n_images=0", "calib.n_images"),
    ("calib.batch_size=0", "calib.batch_size"),
    ("device=cuda:7", "device"),
    ("device=tpu", "device"),
    ("model.source=hub", "model.source"),
])
def test_bad_values_name_their_key(run_config, override, key):
    if override.startswith("device=cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    cfg = run_config(*TINY, "quant=rtn", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_run(cfg)


def test_a_non_boolean_reuse_freed_memory_is_refused_when_composed(run_config):
    with pytest.raises(ConfigError, match="reuse_freed_memory='maybe' is invalid: it must be true or false"):
        run_config(*TINY, "quant=rtn", "reuse_freed_memory=maybe")


def test_good_config_passes(run_config):
    validate_run(run_config(*TINY, "quant=ours"))


def test_unwritable_root_is_refused(run_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="paths.root"):
        validate_run(run_config(*TINY, f"paths.root={blocker}/runs"))


def test_missing_inputs_are_refused_up_front(run_config, tmp_path):
    with pytest.raises(ConfigError, match="model.ckpt"):
        validate_run(run_config(*TINY, "model.source=official", f"+model.ckpt={tmp_path}/none.pth",
                                f"+model.vae_ckpt={tmp_path}/none.pth"))
    imagenet = ["model.reference=imagenet256", "model.feature_extractor=varq-digits"]
    with pytest.raises(ConfigError, match="eval.reference_npz"):
        validate_run(run_config(*TINY, *imagenet, f"+eval.reference_npz={tmp_path}/missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ConfigError, match=r"lacks the keys \['mu', 'sigma'\]"):
        validate_run(run_config(*TINY, *imagenet, f"+eval.reference_npz={bad}"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01binary")
    with pytest.raises(ConfigError, match="not a readable npz"):
        validate_run(run_config(*TINY, *imagenet, f"+eval.reference_npz={garbage}"))


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "varq.run", *args, f"paths.root={tmp_path}/runs"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_before_any_folder_exists(tmp_path):
    out = _cli(tmp_path, "eval.top_p=2")
    assert out.returncode == 2, out.stderr
    assert "eval.top_p=2.0 is invalid" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # neither a run directory nor Hydra's output folder
    # a sweep is checked point by point before its first job: the good point does not run either
    out = _cli(tmp_path, "-m", "quant=rtn", "bits=w4a4,w6a6", "eval.samples_per_class=1,0")
    assert out.returncode == 2 and "sweep point" in out.stderr and "eval.samples_per_class=0" in out.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- run identity over file contents


def _official_files(folder: Path, seed: int) -> tuple[Path, Path]:
    from tests.tiny import tiny_var, tiny_vqvae

    folder.mkdir(parents=True, exist_ok=True)
    var_path, vae_path = folder / "var_d2.pth", folder / "vae.pth"
    torch.save(tiny_var(seed).state_dict(), var_path)
    torch.save(tiny_vqvae().state_dict(), vae_path)
    return var_path, vae_path


def test_another_checkpoint_file_is_another_run(run_config, tmp_path):
    a_var, a_vae = _official_files(tmp_path / "A", seed=0)
    b_var, b_vae = _official_files(tmp_path / "B", seed=1)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "var_d2.pth").write_bytes(a_var.read_bytes())

    def cfg(var_path, vae_path):
        return run_config(*TINY, "quant=rtn", "model.source=official", f"+model.ckpt={var_path}",
                          f"+model.vae_ckpt={vae_path}")

    rid_a = run_id(cfg(a_var, a_vae))
    assert run_id(cfg(b_var, b_vae)) != rid_a  # same config, other weights
    assert run_id(cfg(moved / "var_d2.pth", a_vae)) == rid_a  # same bytes at another path
    # the calibration cache is keyed by the same identity
    from varq.calib.calib_set import cache_key

    assert cache_key(cfg(a_var, a_vae), torch.device("cpu")) != cache_key(cfg(b_var, b_vae), torch.device("cpu"))


def test_file_hash_is_cached_by_size_and_mtime(tmp_path):
    import hashlib

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f, tmp_path / "cache") == hashlib.sha256(b"abc" * 1000).hexdigest()
    f.write_bytes(b"xyz" * 1000)  # same size: a new mtime still invalidates the cached digest
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert file_sha256(f, tmp_path / "cache") == hashlib.sha256(b"xyz" * 1000).hexdigest()


def test_nan_weights_are_refused_at_load_naming_file_and_key():
    from tests.tiny import tiny_var

    var = tiny_var()
    state = var.state_dict()
    state["blocks.1.attn.proj.weight"] = state["blocks.1.attn.proj.weight"].clone()
    state["blocks.1.attn.proj.weight"][0, 3] = float("nan")
    with pytest.raises(CheckpointError, match=r"ckpt\.pth.*'blocks\.1\.attn\.proj\.weight'"):
        load_checked(var, state, Path("/data/ckpt.pth"), "model.ckpt")


# ---------------------------------------------------------------- state that heals


def test_metric_asked_later_is_computed_without_regenerating(run_config, count_batches):
    first = pipeline.run(run_config(*TINY, "quant=fp16", "eval.metrics=[fid]"))
    assert first.row["inception_score"] is None and first.row["metrics_requested"] == ["fid"]
    count_batches.clear()
    second = pipeline.run(run_config(*TINY, "quant=fp16", "eval.metrics=[fid,inception_score]"))
    assert count_batches == [] and second.row["inception_score"] is not None
    assert second.row["fid"] == pytest.approx(first.row["fid"])


@pytest.mark.parametrize("artifact", ["row.json", "metrics.json", "quantizer_state.pt", "timings.json"])
def test_truncated_artifact_is_moved_aside_and_rebuilt(run_config, count_batches, artifact, caplog):
    cfg = run_config(*TINY, "quant=rtn")
    first = pipeline.run(cfg)
    path = first.paths.run_dir / artifact
    if artifact == "quantizer_state.pt":  # rtn needs no calibration; use a method that keeps a state
        cfg = run_config(*TINY, "quant=smoothquant")
        first = pipeline.run(cfg)
        path = first.paths.run_dir / artifact
        first.paths.row.unlink()
        for shard in first.paths.samples_dir.glob("*.npz"):
            shard.unlink()
    elif artifact != "row.json":
        first.paths.row.unlink()  # killed before the row: the damaged artifact is read on the way
    path.write_bytes(path.read_bytes()[:7])
    count_batches.clear()
    with caplog.at_level(logging.WARNING):
        second = pipeline.run(cfg)
    assert (path.parent / (path.name + ".corrupt")).is_file()
    assert str(path) in caplog.text
    assert second.row["fid"] == pytest.approx(first.row["fid"]) and second.row["bits"] == "w4a4"
    assert read_json_dict(second.paths.row) == second.row
    if artifact != "quantizer_state.pt":
        assert count_batches == []  # only the damaged artifact's stage ran again


def test_binary_row_and_reference_stats_heal(run_config, count_batches):
    cfg = run_config(*TINY, "quant=rtn")
    first = pipeline.run(cfg)
    first.paths.row.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    stats = pipeline.fp16_stats_path(cfg)
    assert stats.is_file()
    stats.write_bytes(b"PK\x03\x04truncated")
    first.paths.metrics.unlink()  # so fid2fp16 needs the reference statistics again
    second = pipeline.run(cfg)
    assert second.row["fid2fp16"] == pytest.approx(first.row["fid2fp16"], rel=1e-9)
    assert (stats.parent / (stats.name + ".corrupt")).is_file()


def test_lost_fp16_samples_are_regenerated_before_the_quantized_run(run_config, count_batches):
    cfg = run_config(*TINY, "quant=rtn")
    first = pipeline.run(cfg)
    pipeline.fp16_stats_path(cfg).unlink()
    for shard in first.reference.paths.samples_dir.glob("*.npz"):
        shard.unlink()
    first.paths.row.unlink()
    first.paths.metrics.unlink()
    count_batches.clear()
    second = pipeline.run(cfg)
    assert sorted(count_batches) == [0, 1]  # the reference's two batches; the quantized samples were intact
    assert second.row["fid2fp16"] == pytest.approx(first.row["fid2fp16"], rel=1e-9)


def test_shard_copied_from_another_run_is_regenerated(run_config, count_batches):
    fp16 = pipeline.run(run_config(*TINY, "quant=fp16"))
    cfg = run_config(*TINY, "quant=rtn")
    rtn = pipeline.run(cfg)
    target = rtn.paths.samples_dir / "batch_000000.npz"
    target.write_bytes((fp16.paths.samples_dir / "batch_000000.npz").read_bytes())  # valid checksum, wrong run
    assert not gen_module.samples_complete(cfg.eval, cfg.model.num_classes, rtn.paths.samples_dir)
    rtn.paths.row.unlink()
    count_batches.clear()
    pipeline.run(cfg)
    assert count_batches == [0]
    assert (target.parent / (target.name + ".corrupt")).is_file()


def test_timings_sum_over_attempts(tmp_path):
    timings = pipeline.Timings(tmp_path / "timings.json")
    with pytest.raises(KeyboardInterrupt), timings.stage("generate"):
        time.sleep(0.02)
        raise KeyboardInterrupt  # a killed attempt still counts
    first = timings.values["time_generate_s"]
    with pipeline.Timings(tmp_path / "timings.json").stage("generate"):
        time.sleep(0.02)
    total = pipeline.Timings(tmp_path / "timings.json").values["time_generate_s"]
    assert first >= 0.02 and total >= first + 0.02


def test_disk_full_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "sub" / "row.json"
    with pytest.raises(ArtifactWriteError, match=str(target)) as err:
        atomic_write_bytes(target, b"{}")
    assert "No space left" in str(err.value)
    assert list((tmp_path / "sub").iterdir()) == []


def test_lock_wait_is_logged_with_its_holder(tmp_path, caplog):
    lock = tmp_path / "run.lock"
    inside = threading.Event()
    release = threading.Event()

    def holder():
        with held(lock, "run A"):
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(5)
    threading.Timer(0.3, release.set).start()
    with caplog.at_level(logging.WARNING), held(lock, "run A"):
        pass
    thread.join()
    assert "waiting for run A held by pid" in caplog.text and json.dumps(str(os.getpid()))[1:-1] in caplog.text


def test_truncated_calibration_cache_is_moved_aside_and_rebuilt(run_config, caplog):
    from tests.tiny import tiny_var, tiny_vqvae
    from varq.calib import build_calibration_set, calib_cache_path

    cfg = run_config(*TINY, "quant=ours", "calib=random")
    var, vqvae = tiny_var(), tiny_vqvae()
    first = build_calibration_set(cfg, var, vqvae, "cpu")
    path = calib_cache_path(cfg, "cpu")
    path.write_bytes(path.read_bytes()[:11])
    with caplog.at_level(logging.WARNING):
        again = build_calibration_set(cfg, var, vqvae, "cpu")
    assert (path.parent / (path.name + ".corrupt")).is_file() and str(path) in caplog.text
    assert torch.equal(again.labels_N, first.labels_N) and torch.equal(again.teacher_input_NLC, first.teacher_input_NLC)
