"""Spatial features for sFID, taken the way ADM's evaluator takes them from Inception's ``mixed_6/conv``.

ADM reads the 17×17×192 map of ``mixed_6/conv`` (in NHWC order), keeps its first 7 channels and flattens them to
17·17·7 = 2023 values per image. `SpatialTap` does the same on any extractor: it records the output of one submodule
during the ordinary forward pass (no second pass), keeps channels ``[:7]`` and flattens in H, W, C order, so the
statistics line up element for element with the ``mu_s``/``sigma_s`` stored in ADM's reference batches.

For the digits classifier the tapped map is ``conv3`` after its ReLU (8×8, the last map before pooling), giving
8·8·7 = 448 values: like ``mixed_6/conv`` it is a mid-to-late convolutional map that still keeps where things are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]


def flatten_spatial(map_BCHW: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """B×C×H×W → B×(H·W·7): the first 7 channels flattened in NHWC order (TF's layout), float32 on the CPU."""
    if map_BCHW.dim() != 4 or map_BCHW.shape[1] < SPATIAL_CHANNELS:
        raise ValueError(f"spatial features need a B×C×H×W map with C ≥ {SPATIAL_CHANNELS}, got {tuple(map_BCHW.shape)}")
    if relu:
        map_BCHW = F.relu(map_BCHW)
    return map_BCHW[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(map_BCHW), -1).float().cpu().clone()


class SpatialTap:
    """``with SpatialTap(extractor, "Mixed_6d.branch1x1") as tap: extractor(x); tap.take()`` → B×D spatial features.

    The hook lives only inside the ``with`` block and only on this model instance.
    """

    def __init__(self, model: torch.nn.Module, module_path: str, relu: bool = False) -> None:
        try:
            self.module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(
                f"extractor {type(model).__name__} has no submodule {module_path!r} for spatial features") from None
        self.relu = relu
        self._last: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._last = flatten_spatial(output, self.relu)

    def __enter__(self) -> SpatialTap:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def take(self) -> torch.Tensor:
        if self._last is None:
            raise RuntimeError("the tapped module did not run during the forward pass")
        out, self._last = self._last, None
        return out
