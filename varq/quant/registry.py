"""Method registry: the config option name, the registry key and the row value are the same string."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

# name -> (module that defines it); imported lazily so selecting one method never imports the others
_METHOD_MODULES: dict[str, str] = {
    "fp16": "varq.quant.methods.fp16",
    "rtn": "varq.quant.methods.rtn",
    "litevar": "varq.quant.methods.litevar",
    "ours": "varq.quant.methods.ours",
    "ours_litevar": "varq.quant.methods.ours",
    "brecq": "varq.quant.methods.brecq",
    "ptq4arvg": "varq.quant.methods.ptq4arvg",
    "smoothquant": "varq.quant.methods.smoothquant",
}
_REGISTRY: dict[str, tuple[type, type]] = {}


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add their hyper-parameters (never bit-widths)."""

    name: str = "fp16"


def register_method(name: str, config_cls: type[MethodConfig]) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"method '{name}' is registered twice")
        _REGISTRY[name] = (cls, config_cls)
        cls.name = name
        return cls

    return decorate


def available_methods() -> list[str]:
    return sorted(_METHOD_MODULES)


def _load(name: str) -> tuple[type, type]:
    if name not in _METHOD_MODULES:
        raise KeyError(f"unknown quantization method '{name}'; available: {', '.join(available_methods())}")
    if name not in _REGISTRY:
        importlib.import_module(_METHOD_MODULES[name])
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return _load(name)[1]


def get_method(name: str) -> type:
    return _load(name)[0]
