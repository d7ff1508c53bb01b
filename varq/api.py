"""The library API: quantize a VAR inside your own code, save its quantizer state, load it back.

    qvar = varq.quantize(var, method="ours", bits="w4a4", vqvae=vqvae, calib={"name": "random", "n_images": 8})
    varq.save_quantized(qvar, "ours_w4a4.pt")
    qvar = varq.load_quantized(fresh_fp_var, "ours_w4a4.pt")

Method hyper-parameters start from the same YAML files as ``python -m varq.run quant=<method>`` (the paper's
values) and are changed with ``options`` (the keys of ``varq/conf/quant/<method>.yaml``). The model is modified in place,
like ``Method.calibrate`` does: pass a copy to keep the FP model.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from varq.atomic import save_torch_atomic
from varq.calib import CalibSet

SAVE_FORMAT = 1
_META_ATTR = "_varq_quantization"  # method, bits and options ride on the quantized module for save_quantized
_METHOD_ATTR = "_varq_method"  # the method instance: some keep state of their own (PTQ4ARVG's folded transforms)


def _override_value(value: Any) -> str:
    """A Python value as a Hydra command-line override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def _run_config(method: str, bits: str, calib: str | Mapping[str, Any] | None, options: Mapping[str, Any] | None,
                overrides: Sequence[str]):
    from varq.compose import compose_run_config

    # the paper's hyper-parameters: no model-specific reconstruction budget for a model varq does not know
    args = [f"quant={method}", f"bits={bits}", "model.recon_iters=null", "model.recon_lr=null"]
    if isinstance(calib, str):
        args.append(f"calib={calib}")
    elif isinstance(calib, Mapping):
        spec = dict(calib)
        if "name" in spec:
            args.append(f"calib={spec.pop('name')}")
        args += [f"calib.{k}={_override_value(v)}" for k, v in spec.items()]
    args += [f"quant.{k}={_override_value(v)}" for k, v in (options or {}).items()]
    try:
        return compose_run_config([*args, *overrides])
    except Exception as err:  # Hydra/omegaconf raise several types, all meaning "bad option"
        raise ValueError(f"varq.quantize: invalid method/bits/calib/options ({err})") from None


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def quantize(model: torch.nn.Module, method: str = "ours", bits: str = "w4a4",
             calib: CalibSet | str | Mapping[str, Any] | None = None, *, vqvae: torch.nn.Module | None = None,
             options: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> torch.nn.Module:
    """The fake-quantized `model` (a varq VAR) under `method` at `bits` (w8a8 … w4a4).

    `calib`: a `CalibSet`; or a builder name (``"random"``, ``"resample"``, ``"dgc"``) or a mapping of
    ``varq/conf/calib`` keys (``{"name": "random", "n_images": 32}``), built here by sampling `model` (needs `vqvae`);
    or None for the method's default builder. `options` overrides the method's hyper-parameters, `overrides` any
    other config key in Hydra syntax (e.g. ``["eval=fid50k"]`` for the sampling settings of the calibration set).
    """
    from varq.quant.registry import available_methods, get_method

    if method not in available_methods():
        raise ValueError(f"varq.quantize: unknown method {method!r}; choose one of {', '.join(available_methods())}")
    cfg = _run_config(method, bits, None if isinstance(calib, CalibSet) else calib, options, overrides)
    impl = get_method(method)(cfg.quant)
    calib_set = None
    if impl.needs_calibration:
        if isinstance(calib, CalibSet):
            calib_set = calib
        else:
            if vqvae is None:
                raise ValueError(f"varq.quantize: building calib={cfg.calib.name!r} samples the model, which needs "
                                 "its VQ-VAE: pass vqvae=, or pass a CalibSet as calib=")
            # built directly, not through the run cache: that cache is keyed by configs, not by this model's weights
            builder = importlib.import_module(f"varq.calib.{cfg.calib.name}")
            calib_set = builder.build(cfg, model, vqvae, _device(model))
    if vqvae is not None:  # methods that generate while calibrating (ours' free-running θ search) need it
        impl.attach_sampler(vqvae, cfg.eval)
    qmodel = impl.calibrate(model, calib_set, cfg.bits)
    setattr(qmodel, _META_ATTR, {"method": method, "bits": asdict(cfg.bits), "options": asdict(cfg.quant)})
    object.__setattr__(qmodel, _METHOD_ATTR, impl)  # a plain attribute, not a submodule
    return qmodel


def save_quantized(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Write what `load_quantized` needs to rebuild `model` from its FP weights: method, bits, options, state."""
    from varq.quant.registry import get_method, method_config_class

    meta = getattr(model, _META_ATTR, None)
    if meta is None:
        raise ValueError("save_quantized: this model was not returned by varq.quantize / varq.load_quantized")
    impl = getattr(model, _METHOD_ATTR, None)
    if impl is None:
        impl = get_method(meta["method"])(method_config_class(meta["method"]).from_options(meta["options"]))
    payload = {"format": SAVE_FORMAT, **meta, "state": impl.quantizer_state(model)}
    save_torch_atomic(Path(path), payload)


def load_quantized(fp_model: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """`fp_model` (the same FP weights the state was calibrated on) turned into the saved fake-quantized model."""
    from varq.config import BitsConfig
    from varq.quant.registry import get_method, method_config_class

    payload = torch.load(path, map_location=_device(fp_model), weights_only=True)  # tensors and plain values only
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise ValueError(f"{path} is not a varq quantizer file (format {SAVE_FORMAT}); write it with save_quantized")
    config = method_config_class(payload["method"]).from_options(payload["options"])  # old key names too
    bits = BitsConfig(**payload["bits"])
    impl = get_method(payload["method"])(config)
    qmodel = impl.load_quantizer_state(fp_model, payload["state"], bits)
    setattr(qmodel, _META_ATTR, {k: payload[k] for k in ("method", "bits", "options")})
    object.__setattr__(qmodel, _METHOD_ATTR, impl)
    return qmodel


def load_model(name: str = "var_digits", device: str | torch.device = "cpu",
               overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(VAR, VQ-VAE) of a ``varq/conf/model`` entry in eval mode, e.g. the shipped ``var_digits``."""
    from varq.compose import compose_run_config
    from varq.models.factory import build_models

    return build_models(compose_run_config([f"model={name}", *overrides]).model, device)
