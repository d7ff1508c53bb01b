"""Calibration-set builders, keyed by ``calib.name`` (one module each, imported lazily), and the shared disk cache.

A builder module defines ``build(cfg, var, vqvae, device) -> CalibSet`` from the FP model; caching, locking and the
atomic write happen here, once for every builder.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from varq.calib.calib_set import CalibSet, cache_path, save_atomic, text_cache_path, try_load
from varq.locks import held

__all__ = ["CalibSet", "available_builders", "build_calibration_set", "calib_cache_path"]

log = logging.getLogger(__name__)

_BUILDER_MODULES = {
    "random": "varq.calib.random",
    "dgc": "varq.calib.dgc",
    "distinct": "varq.calib.distinct",
    "resample": "varq.calib.resample",
}


def available_builders() -> list[str]:
    return sorted(_BUILDER_MODULES)


def calib_cache_path(cfg, device) -> Path:
    return cache_path(cfg, torch.device(device))


def build_calibration_set(cfg, var, vqvae, device) -> CalibSet:
    """The calibration set of ``cfg`` for the FP ``var``: loaded from the cache, or built once and cached."""
    name = cfg.calib.name
    if name not in _BUILDER_MODULES:
        raise KeyError(f"unknown calib={name!r}; available: {', '.join(available_builders())}")
    device = torch.device(device)
    text = cfg.model.family != "var"  # a text-to-image model: generations of calibration prompts (calib.text_set)
    path = text_cache_path(cfg, device) if text else cache_path(cfg, device)
    cached = try_load(path)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two jobs of a sweep usually want the same set: one builds, the other waits and loads.
    with held(path.with_name(path.name + ".lock"), f"calibration set {path.name}"):
        cached = try_load(path)
        if cached is not None:
            return cached
        builder = importlib.import_module("varq.calib.text_set" if text else _BUILDER_MODULES[name])
        log.info("building calibration set %s (%d images)", path.name, cfg.calib.n_images)
        calib_set = builder.build(cfg, var, vqvae, device)
        calib_set.meta = {"builder": name, "key": path.stem, **calib_set.meta}
        save_atomic(calib_set, path)
    return calib_set
