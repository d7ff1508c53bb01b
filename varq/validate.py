"""One validation pass over a run's whole configuration, before anything is written.

``validate_run(cfg)`` checks every group's ranges and options, the metric names, the bit-width label against its
numbers, the output folders, the device, and every input file the run will read (checkpoints, reference
statistics, feature-extractor weights, task images). The first problem raises ``ConfigError`` with one line that
names the key, the bad value and what is valid. Nothing here creates a file or folder.

``ValidateCallback`` runs it from Hydra's ``on_run_start`` / ``on_multirun_start``, i.e. before Hydra creates its
own output folder; a sweep is checked point by point before its first job starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from varq.config import (
    BACKENDS,
    T2I_ASPECT_RATIOS,
    T2I_RESOLUTIONS,
    TEXT_DTYPES,
    ConfigError,
    RunConfig,
    check_bits,
)
from varq.metrics.registry import METRICS as METRIC_REGISTRY
from varq.models.fast_decoder import DECODERS
from varq.sample.batches import DTYPES

WEIGHT_SOURCES = ("official", "asset", "random")
# Every metric a run can report (the registry's names are the row's columns)
METRICS = tuple(METRIC_REGISTRY)


def _need(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {valid}")


def check_eval(cfg: RunConfig) -> None:
    ev, num_classes = cfg.eval, cfg.model.num_classes
    _need(ev.samples_per_class >= 1, "eval.samples_per_class", ev.samples_per_class, "it must be an integer ≥ 1")
    _need(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, "it must be an integer ≥ 1")
    _need(0 < ev.top_p <= 1, "eval.top_p", ev.top_p, "it must lie in (0, 1] (1 disables top-p filtering)")
    _need(ev.top_k >= 0, "eval.top_k", ev.top_k, "it must be ≥ 0 (0 disables top-k filtering)")
    _need(ev.cfg >= 0, "eval.cfg", ev.cfg, "the classifier-free guidance scale must be ≥ 0 (1: no guidance)")
    _need(ev.dtype in DTYPES, "eval.dtype", ev.dtype, f"choose one of {', '.join(DTYPES)}")
    _need(ev.decoder in DECODERS, "eval.decoder", ev.decoder,
          f"choose one of {', '.join(DECODERS)} (fast, winograd: the same decoder up to fp32 rounding, faster)")
    _need(ev.num_shards >= 1, "eval.num_shards", ev.num_shards, "it must be an integer ≥ 1")
    _need(ev.grid_images >= 0, "eval.grid_images", ev.grid_images, "it must be ≥ 0")
    if ev.classes is not None:
        bad = [c for c in ev.classes if not 0 <= c < num_classes]
        _need(len(ev.classes) > 0 and not bad, "eval.classes", list(ev.classes),
              f"class ids must lie in [0, {num_classes}) for model={cfg.model.name} (null: every class)")
        _need(len(set(ev.classes)) == len(ev.classes), "eval.classes", list(ev.classes), "class ids must be distinct")
    for name in ev.metrics:
        _need(name in METRICS, "eval.metrics", list(ev.metrics), f"{name!r} is not a metric; choose from {', '.join(METRICS)}")


def check_text(cfg: RunConfig) -> None:
    """The text-to-image protocol (eval.prompts …) and the text encoder (model.text_*): ranges, the prompt file
    (read now: empty file, missing column), local encoder/tokenizer/CLIP folders."""
    ev, m = cfg.eval, cfg.model
    _need(m.text_max_length >= 1, "model.text_max_length", m.text_max_length, "it must be an integer ≥ 1 (Infinity: 512)")
    _need(m.text_dtype in TEXT_DTYPES, "model.text_dtype", m.text_dtype, f"choose one of {', '.join(TEXT_DTYPES)}")
    _need(m.text_random_width >= 1, "model.text_random_width", m.text_random_width, "it must be an integer ≥ 1")
    if ev.prompts is None:
        if ev.name.startswith("t2i"):  # the protocols named t2i_* (DESIGN.md) are text-to-image by definition
            raise ConfigError(f"eval.prompts is not set but eval={ev.name} is a text-to-image protocol; set "
                              "eval.prompts=varq_prompts or a .txt/.csv/.json prompt file path")
        _need("clip_score" not in ev.metrics, "eval.metrics", list(ev.metrics),
              "clip_score needs a text-to-image protocol (set eval.prompts, e.g. eval=t2i_smoke)")
        return
    _need(ev.seeds_per_prompt >= 1, "eval.seeds_per_prompt", ev.seeds_per_prompt, "it must be an integer ≥ 1")
    _need(ev.num_prompts is None or ev.num_prompts >= 1, "eval.num_prompts", ev.num_prompts,
          "it must be ≥ 1 (null: every prompt of the file)")
    _need(ev.tau > 0, "eval.tau", ev.tau, "the sampling temperature must be > 0")
    _need(ev.resolution in T2I_RESOLUTIONS, "eval.resolution", ev.resolution,
          f"choose one of {', '.join(T2I_RESOLUTIONS)} (pixel budget of the scale schedule)")
    _need(any(abs(ev.aspect_ratio - r) < 1e-3 for r in T2I_ASPECT_RATIOS), "eval.aspect_ratio", ev.aspect_ratio,
          f"height/width must be one of {', '.join(map(str, T2I_ASPECT_RATIOS))}")
    from varq.text.encoder import TextEncoderError, TextEncoderSpec, check_local_files
    from varq.text.prompts import PromptFileError, read_prompts

    try:
        read_prompts(ev.prompts, ev.prompts_column, ev.num_prompts)
    except PromptFileError as err:
        raise ConfigError(str(err)) from None
    if m.text_encoder is None:
        raise ConfigError(f"model.text_encoder=None is invalid with eval.prompts={ev.prompts!r}: set it to the T5 "
                          "encoder (a local folder, a hub id such as google/flan-t5-xl, or random for random weights)")
    try:
        check_local_files(TextEncoderSpec.from_model_config(m))
    except TextEncoderError as err:
        raise ConfigError(str(err)) from None
    if ev.clip_weights is not None and "clip_score" in ev.metrics:
        from varq.metrics.clip_score import ClipWeightsError, check_clip_weights

        try:
            check_clip_weights(ev.clip_weights)
        except ClipWeightsError as err:
            raise ConfigError(str(err)) from None


def check_calib(cfg: RunConfig) -> None:
    c = cfg.calib
    _need(c.n_images >= 1, "calib.n_images", c.n_images, "it must be an integer ≥ 1")
    _need(c.batch_size >= 1, "calib.batch_size", c.batch_size, "it must be an integer ≥ 1")


def check_backend(cfg: RunConfig) -> None:
    """backend=fp8 only where every Linear the method quantizes fits an FP8 GEMM (varq.quant.fp8), decided from the
    config so that a method that cannot run on it is refused before hours of calibration."""
    _need(cfg.backend in BACKENDS, "backend", cfg.backend, f"choose one of {', '.join(BACKENDS)}")
    if cfg.backend == "fp8":
        from varq.quant.fp8 import fp8_run_problem

        problem = fp8_run_problem(cfg.quant, cfg.bits.w_bits, cfg.bits.a_bits)
        if problem is not None:
            raise ConfigError(f"backend=fp8 with quant={cfg.quant_name} bits={cfg.bits_label}: {problem}")


MODEL_FAMILIES = ("var", "infinity")


def check_family(cfg: RunConfig) -> None:
    """A text-to-image model runs a text-to-image protocol, with methods and calibration that have a form for it."""
    m, ev = cfg.model, cfg.eval
    _need(m.family in MODEL_FAMILIES, "model.family", m.family, f"choose one of {', '.join(MODEL_FAMILIES)}")
    if m.family == "var":
        _need(ev.prompts is None, "eval.prompts", ev.prompts,
              f"model={m.name} is class-conditional; a prompt file needs a text-to-image model (model=infinity_*)")
        return
    _need(ev.prompts is not None, "eval", ev.name,
          f"model={m.name} generates from text: use a text-to-image protocol (eval=t2i_smoke) or set eval.prompts")
    _need(cfg.task.name == "class_cond", "task", cfg.task.name,
          "inpaint/outpaint/edit are class-conditional VAR tasks; a text-to-image model runs the default task")
    _need(cfg.quant_name not in ("ptq4arvg", "smoothquant"), "quant", cfg.quant_name,
          "its transforms fold into each block's AdaLN rows, and Infinity's AdaLN is shared by all blocks (one "
          "modulation, per-block learned offsets), so there is nothing per block to fold into; use rtn, litevar, "
          "brecq, ours or ours_litevar")
    from varq.quant.registry import get_method

    if get_method(cfg.quant_name).needs_calibration:
        from varq.calib.text_set import TEXT_BUILDERS, calibration_prompts

        _need(cfg.calib.name in TEXT_BUILDERS, "calib", cfg.calib.name,
              f"text-to-image calibration is one of {', '.join(TEXT_BUILDERS)} (calib=dgc has no text form)")
        try:
            calibration_prompts(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def check_model(cfg: RunConfig) -> None:
    m = cfg.model
    _need(m.source in WEIGHT_SOURCES, "model.source", m.source, f"choose one of {', '.join(WEIGHT_SOURCES)}")
    _need(m.num_classes >= 1, "model.num_classes", m.num_classes, "it must be ≥ 1")
    _need(len(m.patch_nums) > 0 and all(p >= 1 for p in m.patch_nums), "model.patch_nums", list(m.patch_nums),
          "a non-empty list of positive side lengths")
    _need(m.attn_query_chunk is None or m.attn_query_chunk >= 3, "model.attn_query_chunk", m.attn_query_chunk,
          "query rows per chunk must be ≥ 3 (null: all rows at once)")
    _need(m.attn_query_chunk is None or cfg.quant_name not in ("ptq4arvg", "smoothquant"), "model.attn_query_chunk",
          m.attn_query_chunk, "static attention quantizers observe whole attention matrices while calibrating; "
          "leave it null for ptq4arvg and smoothquant")
    for key in ("recon_iters", "recon_lr"):
        value = getattr(m, key)
        _need(value is None or value > 0, f"model.{key}", value, "it must be > 0 (null: the method's own value)")


def check_device(name: str) -> None:
    import torch

    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={name!r} is invalid: use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        raise ConfigError(f"device={name!r} is invalid: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} was requested but CUDA is not available here; use device=cpu or device=auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists writable, or could be created: its nearest existing ancestor is a writable dir."""
    probe = folder.expanduser().absolute()
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_paths(cfg: RunConfig) -> None:
    for key in ("root", "cache"):
        folder = Path(getattr(cfg.paths, key))
        if not _writable(folder):
            raise ConfigError(f"paths.{key}={str(folder)!r} is not writable (or lies under a file); point it at a "
                              "folder you can write to")


def _readable_file(path: Path, key: str, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: {what} not found; set {key} to an existing file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}={str(path)!r}: {what} is not readable (permissions); fix them or copy the file")


def check_inputs(cfg: RunConfig) -> None:
    """Every file the run will read, present and readable now, not after an hour of generation."""
    from varq.models.checkpoint import CheckpointError

    if cfg.model.source == "official":
        from varq.models.factory import resolve_official_paths

        try:
            var_path, vae_path = resolve_official_paths(cfg.model)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        _readable_file(var_path, "model.ckpt", "VAR checkpoint")
        _readable_file(vae_path, "model.vae_ckpt", "VQ-VAE checkpoint")
    wanted = set(cfg.eval.metrics)
    if not wanted:
        return
    if cfg.model.feature_extractor == "inception":
        from varq.metrics.extractors import InceptionWeightsError, inception_weights_path

        try:
            _readable_file(Path(inception_weights_path(cfg.eval.inception_weights)), "eval.inception_weights",
                           "Inception weights")
        except InceptionWeightsError as err:
            raise ConfigError(str(err).replace("\n", " ")) from None
    if cfg.task.name == "class_cond" and cfg.model.reference == "imagenet256" and "fid" in wanted:
        check_reference_npz(cfg.eval.reference_npz)
    if cfg.task.name != "class_cond" and cfg.task.images_dir is not None:
        folder = Path(cfg.task.images_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"task.images_dir={str(folder)!r} is not a folder; point it at ImageNet val with one "
                              "sub-folder per class")


def check_reference_npz(configured: str | None) -> None:
    import numpy as np

    from varq.metrics.fidelity import ADM_REFERENCE_FILE, REFERENCE_NPZ_CONFIG_KEY, REFERENCE_NPZ_ENV

    candidate = configured or os.environ.get(REFERENCE_NPZ_ENV) or None
    if candidate is None:
        raise ConfigError(f"{REFERENCE_NPZ_CONFIG_KEY} is not set and ${REFERENCE_NPZ_ENV} is empty: FID on ImageNet "
                          f"needs ADM's reference batch; set {REFERENCE_NPZ_CONFIG_KEY}=/path/to/{ADM_REFERENCE_FILE} "
                          "or drop fid from eval.metrics")
    path = Path(candidate).expanduser()
    _readable_file(path, REFERENCE_NPZ_CONFIG_KEY, "FID reference statistics")
    try:
        with np.load(path, allow_pickle=False) as data:  # members load lazily: only the keys are read here
            missing = {"mu", "sigma"} - set(data.files)
    except Exception as err:
        raise ConfigError(f"{REFERENCE_NPZ_CONFIG_KEY}={str(path)!r} is not a readable npz ({type(err).__name__}); "
                          f"point it at {ADM_REFERENCE_FILE}") from None
    if missing:
        raise ConfigError(f"{REFERENCE_NPZ_CONFIG_KEY}={str(path)!r} lacks the keys {sorted(missing)}; it must hold "
                          "FID statistics mu and sigma (ADM's reference batch)")


def validate_run(cfg: RunConfig) -> None:
    """All checks, cheapest first; raises ConfigError on the first problem. Writes nothing."""
    check_bits(cfg.bits)
    check_backend(cfg)
    check_model(cfg)
    check_eval(cfg)
    check_text(cfg)
    check_family(cfg)
    check_calib(cfg)
    check_paths(cfg)
    check_device(cfg.device)
    check_inputs(cfg)


def run_config_from_hydra(cfg) -> RunConfig:
    """The typed config of a composed Hydra config, without Hydra's own node and the per-invocation ``shard``."""
    from omegaconf import OmegaConf, open_dict

    from varq.compose import to_run_config

    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(node):
        node.pop("hydra", None)
        node.pop("shard", None)
    return to_run_config(node)


def sweep_points(config) -> list[list[str]]:
    """The override lists of every point of a basic-sweeper multirun (sweeper params first, as Hydra does)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    node = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _fail(err: Exception, where: str = "") -> None:
    print(f"varq: error: {where}{err}", file=sys.stderr)
    sys.exit(2)


class ValidateCallback(Callback):
    """Refuses a bad run or sweep point before Hydra writes its output folder (exit 2, one line)."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            validate_run(run_config_from_hydra(config))
        except ConfigError as err:
            _fail(err)

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra import compose

        if config.hydra.sweeper.get("_target_", "").rsplit(".", 1)[-1] != "BasicSweeper":
            return  # another sweeper draws its points itself; each job still validates in varq.run
        config_name = kwargs.get("config_name") or "config"
        for job in sweep_points(config):
            try:
                validate_run(run_config_from_hydra(compose(config_name=config_name, overrides=job)))
            except ConfigError as err:
                _fail(err, f"sweep point [{' '.join(job)}]: ")
