"""What a run *is*: the hashes that name run directories, key the calibration cache and group rows in tables.

- ``run_id``: everything that determines a run's numbers — the FP model (including the content of its checkpoint
  files), the sampling protocol and task, the method and its hyper-parameters, the bits, the calibration set, and
  the files the metrics are measured with (reference statistics, feature-extractor weights), and the backend the
  quantized Linears ran on when it is not the default. Another file is
  another run, even under the same path; the same file moved elsewhere is the same run.
- ``protocol_id``: what makes two rows comparable in one table — model, task and sampling protocol without the
  seeds, which are the repeat axis a table aggregates over.
- ``quant_id`` / ``calib_id``: the method's hyper-parameters, the calibration set without its seed.

File contents enter as sha256, cached by (path, size, mtime) in memory and under ``paths.cache/filehash/`` so a
2 GB checkpoint is hashed once per machine, not once per sweep point.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from varq.compose import calib_label
from varq.config import DEFAULT_BACKEND, RunConfig, TaskConfig, stable_hash

_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 of a file's content, computed once per (path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    record = Path(cache_dir) / "filehash" / f"{hashlib.sha1(real.encode()).hexdigest()[:20]}.json" if cache_dir else None
    if record is not None and record.is_file():
        try:
            saved = json.loads(record.read_text())
            if (saved["path"], saved["size"], saved["mtime_ns"]) == key:
                _MEMO[key] = saved["sha256"]
                return saved["sha256"]
        except (ValueError, KeyError, OSError):
            pass  # a damaged record is just recomputed and rewritten
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _MEMO[key] = digest
    if record is not None:
        from varq.atomic import ArtifactWriteError, write_json_atomic

        try:
            write_json_atomic(record, {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
        except ArtifactWriteError:
            pass  # the cache only saves time; a read-only cache folder must not stop a run
    return digest


# Fields added to the configs after runs were made with them (the model family, the text-to-image protocol): at
# their defaults they change nothing that runs, so they are left out of the identity and earlier run ids stay valid.
LATER_MODEL_FIELDS = ("family", "text_encoder", "text_tokenizer", "text_encoder_revision", "text_max_length",
                      "text_dtype", "text_random_width", "attn_query_chunk")
# speed options of a method added later (reconstruction's attention pass): at their defaults ids stay as they were
LATER_QUANT_FIELDS = ("attention_pass",)
LATER_EVAL_FIELDS = ("prompts", "prompts_column", "num_prompts", "seeds_per_prompt", "tau", "resolution",
                     "aspect_ratio", "clip_weights", "decoder")


def _without_defaults(values: dict, defaults: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in values.items() if not (k in keys and k in defaults and v == defaults[k])}


def model_identity(cfg: RunConfig) -> dict:
    """What determines the FP model's outputs: architecture and the content of its weights (not their paths)."""
    model = _without_defaults(asdict(cfg.model), asdict(type(cfg.model)()), LATER_MODEL_FIELDS)
    # paths do not change the weights, and the reconstruction budget is already part of the method's config
    for key in ("ckpt", "vae_ckpt", "ckpt_dir", "hub_repo", "recon_iters", "recon_lr"):
        model.pop(key)
    if cfg.model.source == "asset":
        # retrained shipped weights (make assets) must not reuse runs of the old ones
        from varq.models.assets import read_checksums

        model["asset_sha256"] = {k: v[:16] for k, v in sorted(read_checksums().items())}
    elif cfg.model.source == "official":
        from varq.models.factory import resolve_official_paths

        var_path, vae_path = resolve_official_paths(cfg.model)
        model["ckpt_sha256"] = file_sha256(var_path, cfg.paths.cache)[:16]
        model["vae_sha256"] = file_sha256(vae_path, cfg.paths.cache)[:16]
    return model


def eval_identity(cfg: RunConfig) -> dict:
    """What determines which images are generated: sampling protocol + task (sharding and metrics excluded)."""
    ev = _without_defaults(asdict(cfg.eval), asdict(type(cfg.eval)()), LATER_EVAL_FIELDS)
    # fused_quantizers: compiled quantizers with the eager ones' numbers (a speed option, like sharding)
    for key in ("num_shards", "metrics", "inception_weights", "reference_npz", "grid_images", "clip_weights",
                "fused_quantizers"):
        ev.pop(key, None)
    return {"eval": ev, "task": task_identity(cfg.task)}


def task_identity(task: TaskConfig) -> dict:
    """class_cond reads no task option, so its identity stays {"name"} and existing class_cond run ids are
    unchanged; images_dir is a path and left out like checkpoint paths (the same images moved are the same)."""
    if task.name == "class_cond":
        return {"name": task.name}
    ident = asdict(task)
    ident.pop("images_dir")
    return ident


def scoring_identity(cfg: RunConfig) -> dict:
    """The files metrics are measured with, by content. Empty for the shipped digits model, whose classifier and
    reference are shipped assets already named in the model identity, so its run ids stay as they were."""
    ident: dict[str, Any] = {}
    wanted = set(cfg.eval.metrics)
    if cfg.model.reference == "imagenet256" and "fid" in wanted and cfg.task.name == "class_cond":
        from varq.metrics.fidelity import REFERENCE_NPZ_ENV

        npz = cfg.eval.reference_npz or os.environ.get(REFERENCE_NPZ_ENV) or None
        if npz is not None and Path(npz).expanduser().is_file():
            ident["reference_sha256"] = file_sha256(Path(npz).expanduser(), cfg.paths.cache)[:16]
    if "clip_score" in wanted and cfg.eval.clip_weights:
        folder = Path(cfg.eval.clip_weights).expanduser()
        # the CLIP model by content (config, weights, processor and tokenizer files), not by where it lies
        files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
        ident["clip_sha256"] = {p.name: file_sha256(p, cfg.paths.cache)[:16] for p in files}
    if cfg.model.feature_extractor == "inception" and wanted:
        from varq.metrics.extractors import InceptionWeightsError, inception_weights_path

        try:
            ident["feature_weights_sha256"] = file_sha256(inception_weights_path(cfg.eval.inception_weights),
                                                          cfg.paths.cache)[:16]
        except InceptionWeightsError:
            pass  # validation refuses such a run before its id is needed
    return ident


def quant_identity(cfg: RunConfig) -> dict:
    """The method's hyper-parameters; a later field at its default is left out (earlier ids stay valid)."""
    defaults = {f.name: f.default for f in fields(cfg.quant) if f.default is not MISSING}
    return _without_defaults(asdict(cfg.quant), defaults, LATER_QUANT_FIELDS)


def quant_id(cfg: RunConfig) -> str:
    return stable_hash(quant_identity(cfg))


def calib_id(cfg: RunConfig) -> str:
    """The calibration set without its seed ('none' for methods that use none): seeds are a repeat axis."""
    if calib_label(cfg) == "none":
        return "none"
    calib = asdict(cfg.calib)
    calib.pop("seed")
    return stable_hash(calib)


def protocol_identity(cfg: RunConfig) -> dict:
    ident = {"model": model_identity(cfg), **eval_identity(cfg)}
    ident["eval"].pop("seed")
    scoring = scoring_identity(cfg)
    if scoring:
        ident["scoring"] = scoring
    return ident


def protocol_id(cfg: RunConfig) -> str:
    """Rows of equal protocol_id are comparable: same model, task, sampling protocol and scoring files."""
    return stable_hash(protocol_identity(cfg))


def run_id(cfg: RunConfig) -> str:
    """Identity of a run: model, sampling protocol, method, bits, calibration, backend and scoring files (paths and
    logging excluded)."""
    ident = {"model": model_identity(cfg), **eval_identity(cfg), "quant": quant_identity(cfg)}
    if cfg.quant.name != "fp16":
        ident["bits"] = asdict(cfg.bits)
    if calib_label(cfg) != "none":
        ident["calib"] = asdict(cfg.calib)
    if cfg.backend != DEFAULT_BACKEND:  # another backend computes other numbers; absent at the default (ids unchanged)
        ident["backend"] = cfg.backend
    scoring = scoring_identity(cfg)
    if scoring:  # absent for the digits model: its run ids are unchanged
        ident["scoring"] = scoring
    return stable_hash(ident)
