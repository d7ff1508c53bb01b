"""Conversions between stored uint8 images and the model's float range.

No heavy imports here: the sampler calls `to_uint8` on every batch.
"""

from __future__ import annotations

import torch


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1] (the range the VQ-VAE encodes and decodes)."""
    if images_u8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_u8.dtype}")
    return images_u8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images_float: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255] by rounding to nearest, then clamping.

    Rounding (``floor((x + 1) / 2 * 255 + 0.5)``), not truncation: truncation would shift every pixel down by
    half a level on average and bias FID against the reference images, which are rounded too.
    """
    x = (images_float.detach().to(torch.float32) + 1.0) * 127.5 + 0.5
    return x.floor_().clamp_(0.0, 255.0).to(torch.uint8)
