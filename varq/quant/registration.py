"""Where methods register: the base of every method config and the ``@register_method`` decorator.

Method modules import this (never `varq.quant.registry`, which imports them by name), so the lookup and the
methods form no import cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger(__name__)

REGISTRY: dict[str, tuple[type, type]] = {}


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
        if name in REGISTRY and REGISTRY[name][0] is not cls:
            raise ValueError(f"method '{name}' is registered twice")
        REGISTRY[name] = (cls, config_cls)
        cls.name = name
        return cls

    return decorate
