"""Reference npz files: ADM's reference batches and varq's own reference statistics, read through one Mapping.

Keys a reference may hold (all optional except mu/sigma):

- ``mu``, ``sigma``: pool-feature statistics (FID);
- ``mu_s``, ``sigma_s``: spatial-feature statistics (sFID);
- ``features``: pool features of the reference images (precision/recall need the points, not only statistics);
- ``arr_0``: the reference images themselves (ADM's batches), from which ``features`` can be extracted on demand;
- ``extractor``: the feature extractor the statistics belong to (varq's files; ADM's are Inception).

Members of an npz load lazily, so ADM's 10k-image ``arr_0`` is read only when precision/recall ask for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURES_KEY = "features"
EXTRACTOR_KEY = "extractor"


class NpzReference(Mapping):
    """A reference npz as a read-only Mapping; ``features`` may come from ``arr_0`` through `features_fn`."""

    def __init__(self, path: str | os.PathLike[str],
                 features_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
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
        self._features_fn = features_fn
        self._cache: dict[str, Any] = {}

    def _keys(self) -> list[str]:
        keys = [k for k in (*STAT_KEYS, FEATURES_KEY, EXTRACTOR_KEY) if k in self._files]
        if FEATURES_KEY not in self._files and "arr_0" in self._files and self._features_fn is not None:
            keys.append(FEATURES_KEY)
        return keys

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
                if key == FEATURES_KEY and key not in self._files:
                    self._cache[key] = np.asarray(self._features_fn(data["arr_0"]), np.float32)
                elif key == EXTRACTOR_KEY:
                    self._cache[key] = str(data[key])
                elif key == FEATURES_KEY:
                    self._cache[key] = np.asarray(data[key], np.float32)
                else:
                    self._cache[key] = np.asarray(data[key], np.float64)
        return self._cache[key]

    @property
    def has_images(self) -> bool:
        return "arr_0" in self._files


def reference_arrays(ref: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """What `save_reference_npz` writes: the statistics, features and extractor a reference holds."""
    out = {k: np.asarray(ref[k], np.float64) for k in STAT_KEYS if k in ref}
    if FEATURES_KEY in ref:
        out[FEATURES_KEY] = np.asarray(ref[FEATURES_KEY], np.float32)
    if EXTRACTOR_KEY in ref:
        out[EXTRACTOR_KEY] = np.array(str(ref[EXTRACTOR_KEY]))
    return out
