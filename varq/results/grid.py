"""A PNG grid of the first samples of a run (for eyes, W&B and the HTML report)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from varq.atomic import atomic_write_bytes


def spread_indices(n_samples: int, count: int) -> list[int]:
    """``count`` sample indices spread evenly over a class-major sample set (so every class gets a column)."""
    count = min(count, n_samples)
    return [int(i * n_samples / count) for i in range(count)]


def grid_array(images_N3HW: torch.Tensor, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    n, _, h, w = images_N3HW.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images_N3HW.numpy()):
        r, c = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = img.transpose(1, 2, 0)
    return canvas


def save_grid(images_N3HW: torch.Tensor, path: Path, ncols: int | None = None) -> None:
    import io

    if len(images_N3HW) == 0:
        return
    buf = io.BytesIO()
    Image.fromarray(grid_array(images_N3HW, ncols)).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def mask_overlay(images_N3HW: torch.Tensor, keep_PP: torch.Tensor) -> torch.Tensor:
    """uint8 images with the regenerated region (keep == 0, upsampled nearest to the image) tinted red."""
    import torch.nn.functional as F

    h, w = images_N3HW.shape[-2:]
    gen_11HW = F.interpolate(1.0 - keep_PP[None, None].float(), size=(h, w), mode="nearest").bool()
    red_13HW = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    tinted = (0.5 * images_N3HW.float() + 0.5 * red_13HW).round().to(torch.uint8)
    return torch.where(gen_11HW, tinted, images_N3HW)


def save_task_panel(rows: list[torch.Tensor], path: Path, scale: int = 1) -> None:
    """One row per tensor (e.g. inputs, mask overlay, FP16 result, quantized result), one column per image;
    ``scale`` enlarges pixels (nearest) so 16×16 digits stay legible."""
    n = min(len(r) for r in rows)
    images = torch.cat([r[:n] for r in rows])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    save_grid(images, path, ncols=n)
