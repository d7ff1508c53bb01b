"""Input images of the editing tasks (inpaint / outpaint / edit): a catalogue of (image, class) in a fixed order.

Two sources, both a pure function of their files, so the FP16 run and every quantized run edit the same images:

- the digits test split (``varq.data.digits``) at the model's image size, for the digits models;
- a folder laid out like ImageNet val prepared for ``ImageFolder``: one sub-folder per class, class id = rank of
  the sub-folder name in sorted order (the order VAR's ImageNet class ids follow), files sorted by name. Images go
  through VAR's evaluation transform: shorter side resized to round(1.125·size) (Lanczos), centre crop to size.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
MID_RESOLUTION = 1.125  # VAR resizes the shorter side to 1.125 × the final size before the centre crop


def imagenet_val_transform(path: Path, size: int) -> torch.Tensor:
    """One image file → uint8 3×size×size: shorter side to round(1.125·size) (Lanczos), then the centre crop."""
    from PIL import Image

    with Image.open(path) as raw:
        img = raw.convert("RGB")
    mid = round(MID_RESOLUTION * size)
    w, h = img.size
    # the longer side follows the aspect ratio, truncated like torchvision's Resize(int)
    new_w, new_h = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class DigitsInputs:
    """The held-out digits test split (never seen by the digits VAR or its VQ-VAE in training)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    @cached_property
    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        from varq.data.digits import load_digits_split

        return load_digits_split("test", image_size=self.image_size)

    @property
    def labels(self) -> list[int]:
        return self._split[1].tolist()

    def identity(self, image_ids: Sequence[int]) -> dict:
        """What the images ``image_ids`` are (keys cached statistics of them)."""
        return {"source": "digits-test", "image_size": self.image_size, "ids": list(image_ids)}

    def load(self, image_ids: Sequence[int]) -> torch.Tensor:
        return self._split[0][torch.as_tensor(list(image_ids), dtype=torch.long)]


class FolderInputs:
    """ImageNet-val-style folder: ``root/<class folder>/<image>``; needs exactly ``num_classes`` class folders."""

    def __init__(self, root: str | Path, image_size: int, num_classes: int):
        self.root, self.image_size, self.num_classes = Path(root).expanduser(), image_size, num_classes

    @cached_property
    def _catalogue(self) -> list[tuple[Path, int]]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"task.images_dir={self.root} is not a folder; point it at ImageNet val laid out "
                                    "as one sub-folder per class (e.g. val/n01440764/*.JPEG)")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        if len(class_dirs) != self.num_classes:
            raise ValueError(f"task.images_dir={self.root} has {len(class_dirs)} class sub-folders, the model has "
                             f"{self.num_classes} classes; class ids are the sorted sub-folder ranks")
        return [(f, c) for c, d in enumerate(class_dirs)
                for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]

    @property
    def labels(self) -> list[int]:
        return [c for _, c in self._catalogue]

    def identity(self, image_ids: Sequence[int]) -> dict:
        """What the images ``image_ids`` are: relative names, so the same images moved elsewhere stay the same."""
        names = [str(self._catalogue[i][0].relative_to(self.root)) for i in image_ids]
        return {"source": "folder", "image_size": self.image_size, "files": names}

    def load(self, image_ids: Sequence[int]) -> torch.Tensor:
        return torch.stack([imagenet_val_transform(self._catalogue[i][0], self.image_size) for i in image_ids])
