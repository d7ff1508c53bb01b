"""Make `import torchvision` work with a CPU torch and PyPI's CUDA torchvision wheel.

With torch 2.13.0+cpu and torchvision 0.28.0 (research/env.md §1), torchvision's compiled library links CUDA
torch and does not load; its import then dies on ``register_fake("torchvision::nms")`` with
``RuntimeError: operator torchvision::nms does not exist``. torch-fidelity imports torchvision at module level,
so the two operator schemas are defined first. Only torchvision's compiled ops (nms, roi_align, …) stay unusable;
torch-fidelity uses none of them. Where torchvision imports normally this does nothing.
"""

from __future__ import annotations

import functools
import sys

import torch


@functools.cache  # idempotent, and the cache keeps the Library alive: dropping it would unregister the schemas
def ensure_torchvision() -> torch.library.Library | None:
    """Import torchvision, defining the missing op schemas first if needed. Call before importing torch_fidelity."""
    try:
        import torchvision  # noqa: F401

        return None
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    # The failed import left half-initialised modules behind; a retry must start from scratch.
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811

    return lib
