"""varq: post-training quantization benchmark suite for visual autoregressive (VAR) image generators.

The library API (`quantize`, `save_quantized`, `load_quantized`, `load_model`) lives in varq.api and is imported
on first use, so ``import varq`` stays free of torch and of any other import-time work.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("quantize", "save_quantized", "load_quantized", "load_model")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from varq import api

        return getattr(api, name)
    raise AttributeError(f"module 'varq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
