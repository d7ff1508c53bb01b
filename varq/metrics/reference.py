"""Reference npz files: ADM's reference batches and varq's own reference statistics, read through one Mapping.

Keys a reference may hold (all optional except mu/sigma):

- ``mu``, ``sigma``: pool-feature statistics (FID);
- ``mu_s``, ``sigma_s``: spatial-feature statistics (sFID);
- ``features``: pool features of the reference images (precision/recall need the points, not only statistics);
- ``arr_0``: the reference images themselves (ADM's batches); `NpzReference.features_for` extracts their features
  with the extractor that scores the samples, on first use, and keeps them in a cache folder;
- ``extractor``: the feature extractor the statistics belong to (varq's files; ADM's are Inception).

Members of an npz load lazily, so ADM's 10k-image ``arr_0`` is read only when precision/recall ask for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varq.atomic import save_npz_atomic

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURES_KEY = "features"
EXTRACTOR_KEY = "extractor"


class NpzReference(Mapping):
    """A reference npz as a read-only Mapping of its statistics (and stored features, extractor name)."""

    def __init__(self, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"reference npz {self.path} does not exist")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                self._files = set(data.files)
        except Exception as err:
            raise ValueError(f"reference {self.path} is not a readable npz ({type(err).__name__}: {err})") from None
        missing = {"mu", "sigma"} - self._files
        if missing:
            raise ValueError(f"reference {self.path} lacks the keys {sorted(missing)} (has {sorted(self._files)}); "
                             "build one with `python -m varq.evaluate reference IMAGES OUT.npz`")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._cache: dict[str, Any] = {}

    def _keys(self) -> list[str]:
        return [k for k in (*STAT_KEYS, FEATURES_KEY, EXTRACTOR_KEY) if k in self._files]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        if key not in self._cache:
            with np.load(self.path, allow_pickle=False) as data:
                value = data[key]
            self._cache[key] = (str(value) if key == EXTRACTOR_KEY
                                else np.asarray(value, np.float32 if key == FEATURES_KEY else np.float64))
        return self._cache[key]

    @property
    def has_images(self) -> bool:
        return "arr_0" in self._files

    def features_for(self, extractor: str, extract: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
        """Pool features of the reference images: stored ones, cached ones, or ``extract(uint8 N×3×H×W)`` of arr_0."""
        if FEATURES_KEY in self:
            return self[FEATURES_KEY]
        if not self.has_images:
            raise KeyError(f"{self.path} holds neither features nor images (arr_0)")
        cached = None
        if self.cache_dir is not None:
            stat = self.path.stat()
            cached = self.cache_dir / f"ref-features-{self.path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{extractor}.npz"
            if cached.is_file():
                with np.load(cached, allow_pickle=False) as data:
                    return data[FEATURES_KEY]
        with np.load(self.path, allow_pickle=False) as data:
            arr = data["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{self.path}: arr_0 must be uint8 N×H×W×3 (ADM layout), got {arr.dtype} {arr.shape}")
        feats = np.asarray(extract(torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))), np.float32)
        if cached is not None:
            save_npz_atomic(cached, {FEATURES_KEY: feats})
        return feats


def reference_arrays(ref: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """What `save_reference_npz` writes: the statistics, features and extractor a reference holds."""
    out = {k: np.asarray(ref[k], np.float64) for k in STAT_KEYS if k in ref}
    if FEATURES_KEY in ref:
        out[FEATURES_KEY] = np.asarray(ref[FEATURES_KEY], np.float32)
    if EXTRACTOR_KEY in ref:
        out[EXTRACTOR_KEY] = np.array(str(ref[EXTRACTOR_KEY]))
    return out
