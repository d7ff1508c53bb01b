"""The typed run configuration of a composed Hydra config: the one place the schemas meet the method registry.

``varq.config`` holds the schemas and imports nothing from varq; what needs to know the methods lives here: the
quant group is validated against the dataclass its method registers, the model's reconstruction budget fills the
method's unset ``iters`` / ``lr``, and the ``calib`` column reads whether the method uses calibration data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from varq.config import (
    DEFAULT_BACKEND,
    BitsConfig,
    CalibConfig,
    ConfigError,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    RunConfig,
    TaskConfig,
    check_bits,
    typed_group,
)
from varq.quant.registry import get_method, method_config_class

TOP_LEVEL_KEYS = ("model", "eval", "quant", "bits", "calib", "task", "logger", "paths", "device", "backend",
                  "reuse_freed_memory", "experiment")


def _flag(cfg, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is invalid: it must be true or false")
    return value


def calib_label(cfg: RunConfig) -> str:
    """Row value of the calib column: 'none' for methods that use no calibration data."""
    return cfg.calib.name if get_method(cfg.quant_name).needs_calibration else "none"


def fp16_config(cfg: RunConfig) -> RunConfig:
    """The same run with the unquantized reference method (its FP16 samples are what FID2FP16 compares against).
    The reference has no quantized layer, so it runs on the default backend: one reference serves every backend."""
    return dataclasses.replace(cfg, quant=method_config_class("fp16")(), backend=DEFAULT_BACKEND)


def apply_model_budget(model: ModelConfig, quant_node: Any) -> Any:
    """Fill a method's unset reconstruction budget: ``iters: null`` / ``lr: null`` (the YAML defaults of the
    reconstructing methods) become the model's ``recon_iters`` / ``recon_lr`` when it sets them, else the method's
    paper default. Any explicit quant.iters=N or quant.lr=X wins, whatever its value (the paper default included).
    Applied before run_id, so the id, config.json and the row show what ran."""
    if quant_node is None:
        return quant_node
    node = OmegaConf.create(OmegaConf.to_container(quant_node))
    for key, budget in (("iters", model.recon_iters), ("lr", model.recon_lr)):
        if key in node and node[key] is None:
            if budget is not None:
                node[key] = budget
            else:
                del node[key]  # the method's dataclass default (the paper's value)
    return node


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Validate a composed Hydra config into typed dataclasses (fails early with the offending key)."""
    # resolve interpolations (e.g. paths.cache: ${paths.root}/cache) while the whole tree is still together
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    unknown = set(cfg.keys()) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}; valid keys: {sorted(TOP_LEVEL_KEYS)}")
    bits = typed_group(BitsConfig, cfg.get("bits"), "bits")
    check_bits(bits)
    quant_node = cfg.get("quant")
    if quant_node is None or "name" not in quant_node:
        raise ConfigError("no quantization method selected: set quant=<name>")
    model = typed_group(ModelConfig, cfg.get("model"), "model")
    method_cls = method_config_class(quant_node.name)
    # keys a method used to call otherwise (quant.keep_fp …) are mapped to their names now, with a warning
    quant_node = OmegaConf.create(method_cls.upgrade_keys(OmegaConf.to_container(apply_model_budget(model, quant_node))))
    quant = typed_group(method_cls, quant_node, "quant")
    return RunConfig(
        model=model,
        eval=typed_group(EvalConfig, cfg.get("eval"), "eval"),
        quant=quant,
        bits=bits,
        calib=typed_group(CalibConfig, cfg.get("calib"), "calib"),
        task=typed_group(TaskConfig, cfg.get("task"), "task"),
        logger=typed_group(LoggerConfig, cfg.get("logger"), "logger"),
        paths=typed_group(PathsConfig, cfg.get("paths"), "paths"),
        device=str(cfg.get("device", "auto")),
        backend=str(cfg.get("backend", DEFAULT_BACKEND)),
        reuse_freed_memory=_flag(cfg, "reuse_freed_memory", True),
    )


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The validated config of ``python -m varq.run OVERRIDES`` without launching it (tools, figures, benchmarks)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf_dir = Path(__file__).resolve().parent / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))
