"""A PNG grid of the first samples of a run (for eyes, W&B and the HTML report)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from varq.sample.shards import atomic_write_bytes


def grid_array(images_N3HW: torch.Tensor, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    n, _, h, w = images_N3HW.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images_N3HW.numpy()):
        r, c = divmod(i, ncols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img.transpose(1, 2, 0)
    return canvas


def save_grid(images_N3HW: torch.Tensor, path: Path, ncols: int | None = None) -> None:
    import io

    if len(images_N3HW) == 0:
        return
    buf = io.BytesIO()
    Image.fromarray(grid_array(images_N3HW, ncols)).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
