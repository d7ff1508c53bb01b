"""Method registry: the config option name, the registry key and the row value are the same string.

A method is one module under `varq.quant.methods` whose class carries ``@register_method("<name>", <Config>)``, plus
one ``varq/conf/quant/<name>.yaml``; nothing else lists it. ``<name>`` is looked up in the module of the same name
first (so selecting one method imports only its own module); a method defined elsewhere (``ours_litevar`` lives in
``ours.py``) is found by importing every public module of the package. Modules whose name starts with ``_`` hold
shared pieces and are never scanned.
"""

from __future__ import annotations

import importlib
import pkgutil

from varq.quant.registration import REGISTRY, MethodConfig, register_method

__all__ = ["MethodConfig", "register_method", "available_methods", "method_config_class", "get_method"]

METHODS_PACKAGE = "varq.quant.methods"


def _import_all() -> None:
    package = importlib.import_module(METHODS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{METHODS_PACKAGE}.{info.name}")


def available_methods() -> list[str]:
    """Every registered method (imports every method module once)."""
    _import_all()
    return sorted(REGISTRY)


def _load(name: str) -> tuple[type, type]:
    if name not in REGISTRY and isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        module = f"{METHODS_PACKAGE}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise  # the method's module exists but one of its own imports is missing
        if name not in REGISTRY:
            _import_all()  # a method registered in another module (ours_litevar in ours.py)
    if name not in REGISTRY:
        raise KeyError(f"unknown quantization method '{name}'; available: {', '.join(available_methods())}")
    return REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return _load(name)[1]


def get_method(name: str) -> type:
    return _load(name)[0]
