"""Method registry: the config option name, the registry key and the row value are the same string.

A method is one module under `varq.quant.methods` whose class carries ``@register_method("<name>", <Config>)``, plus
one ``varq/conf/quant/<name>.yaml``; nothing else lists it. ``<name>`` is looked up in the module of the same name
first (so selecting one method imports only its own module); a method defined elsewhere (``ours_litevar`` lives in
``ours.py``) is found by importing every public module of the package. Modules whose name starts with ``_`` hold
shared pieces and are never scanned.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger(__name__)

METHODS_PACKAGE = "varq.quant.methods"
_REGISTRY: dict[str, tuple[type, type]] = {}


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add their hyper-parameters (never bit-widths).

    ``renamed`` maps a key a config used to accept to its current name. `upgrade_keys` is the one place that
    translates them, so an old command line or saved options file keeps working (with a warning naming the new key).
    """

    name: str = "fp16"
    renamed: ClassVar[dict[str, str]] = {}

    @classmethod
    def upgrade_keys(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` with every renamed key under its current name. No shipped file sets an old name, so an old
        key was set by the user and wins over the new key's value (which then comes from the method's defaults);
        an old key that is null is unset and dropped (a config file may declare it so Hydra accepts an override)."""
        out = dict(options)
        for old, new in cls.renamed.items():
            if old in out:
                value = out.pop(old)
                if value is None:
                    continue
                log.warning("quant.%s is deprecated: it is now quant.%s (set quant.%s=%s instead)", old, new, new,
                            value)
                out[new] = value
        return out

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MethodConfig:
        """The config of ``options`` (a plain mapping, old key names accepted), validated by the dataclass."""
        return cls(**cls.upgrade_keys(options))


def register_method(name: str, config_cls: type[MethodConfig]) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"method '{name}' is registered twice")
        _REGISTRY[name] = (cls, config_cls)
        cls.name = name
        return cls

    return decorate


def _import_all() -> None:
    package = importlib.import_module(METHODS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{METHODS_PACKAGE}.{info.name}")


def available_methods() -> list[str]:
    """Every registered method (imports every method module once)."""
    _import_all()
    return sorted(_REGISTRY)


def _load(name: str) -> tuple[type, type]:
    if name not in _REGISTRY and isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        module = f"{METHODS_PACKAGE}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise  # the method's module exists but one of its own imports is missing
        if name not in _REGISTRY:
            _import_all()  # a method registered in another module (ours_litevar in ours.py)
    if name not in _REGISTRY:
        raise KeyError(f"unknown quantization method '{name}'; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return _load(name)[1]


def get_method(name: str) -> type:
    return _load(name)[0]
