"""Encoded prompts, cached by content hash: a sweep encodes each prompt once, and every run reads the same bits.

One file per prompt under ``<paths.cache>/text_features/<2 hex>/<key>.pt``; the key hashes the prompt text, the
encoder's identity (file hashes, or hub id + resolved revision, or the random seed), ``max_length`` and the
encoder's dtype. Each file holds that prompt's real-token features in the encoder's own dtype, so the float32
features read back equal those of a fresh encode bit for bit (fp16 → fp32 is exact). Files are written atomically;
an unreadable or foreign file is moved aside and the prompt is encoded again.

Why cache per prompt and not recompute: batched matmuls may round differently for another batch composition, so
the FP reference and every quantized run must read the one stored encoding of each prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from varq.atomic import read_or_heal, save_torch_atomic
from varq.text.encoder import (
    TextEncoder,
    TextEncoderSpec,
    TextFeatures,
    load_text_encoder,
    resolve_dtype,
    static_identity,
    static_width,
)

CACHE_SUBDIR = "text_features"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def encoder_fingerprint(encoder: TextEncoder) -> dict:
    """Everything besides the prompt that determines an encoding."""
    return {"encoder": encoder.identity, "max_length": encoder.max_length, "dtype": _dtype_name(encoder.dtype)}


def feature_key(prompt: str, fingerprint: dict) -> str:
    text = json.dumps({"prompt": prompt, **fingerprint}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """``features(prompts)`` → ``TextFeatures``, encoding only the prompts not stored yet.

    Built from a loaded encoder, or with ``for_spec`` from its spec: then the encoder (Flan-T5-XL: ≈2.4 GB in fp16)
    is loaded only when a prompt is missing, so the sweep points after the first never load it."""

    def __init__(self, root: str | Path, encoder: TextEncoder | None = None, batch_size: int = 16, *,
                 fingerprint: dict | None = None, width: int | None = None,
                 loader: Callable[[], TextEncoder] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1")
        if encoder is None and (fingerprint is None or loader is None):
            raise ValueError("give an encoder, or a fingerprint and a loader")
        self.folder = Path(root) / CACHE_SUBDIR
        self.batch_size = batch_size
        self._encoder = encoder
        self._loader = loader
        self.fingerprint = encoder_fingerprint(encoder) if encoder is not None else fingerprint
        self.width = encoder.width if encoder is not None else width  # None: checked once the encoder is loaded

    @classmethod
    def for_spec(cls, root: str | Path, spec: TextEncoderSpec, device: torch.device | str = "cpu",
                 cache_dir: str | None = None, batch_size: int = 16) -> TextFeatureCache:
        """A cache that loads the encoder of ``spec`` only on a miss (a hub id without a pinned revision is loaded
        at once: only loading tells which weights it names)."""
        identity = static_identity(spec, cache_dir)
        if identity is None:
            return cls(root, load_text_encoder(spec, device, cache_dir), batch_size)
        fingerprint = {"encoder": identity, "max_length": spec.max_length,
                       "dtype": _dtype_name(resolve_dtype(spec.dtype, device))}
        return cls(root, None, batch_size, fingerprint=fingerprint, width=static_width(spec),
                   loader=lambda: load_text_encoder(spec, device, cache_dir))

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = self._loader()
            if encoder_fingerprint(self._encoder) != self.fingerprint:  # the spec and the loaded encoder disagree
                raise RuntimeError(f"text encoder identity {encoder_fingerprint(self._encoder)} differs from the "
                                   f"cache key's {self.fingerprint}")
            self.width = self._encoder.width
        return self._encoder

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def _load(self, key: str) -> torch.Tensor | None:
        def check(entry: dict) -> None:
            rows_LC = entry["features_LC"]
            if entry.get("key") != key:
                raise ValueError("stored key differs from the file name")
            if not isinstance(rows_LC, torch.Tensor) or rows_LC.dim() != 2:
                raise ValueError("features are not a 2-D tensor")
            if _dtype_name(rows_LC.dtype) != self.fingerprint["dtype"]:
                raise ValueError(f"features in {rows_LC.dtype}, the encoder runs in {self.fingerprint['dtype']}")
            if self.width is not None and rows_LC.shape[1] != self.width:
                raise ValueError(f"features {rows_LC.shape[1]} wide, the encoder's are {self.width}")
            if not 1 <= rows_LC.shape[0] <= self.fingerprint["max_length"]:
                raise ValueError(f"{rows_LC.shape[0]} tokens outside [1, {self.fingerprint['max_length']}]")

        entry = read_or_heal(self.path(key), lambda p: torch.load(p, map_location="cpu", weights_only=True), check)
        return None if entry is None else entry["features_LC"]

    def rows(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's (L_i, C) features in the encoder's dtype; missing ones are encoded and stored."""
        keys = [feature_key(p, self.fingerprint) for p in prompts]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, str] = {}  # key → prompt, first occurrence order (duplicates encode once)
        for key, prompt in zip(keys, prompts):
            if key in found or key in missing:
                continue
            rows_LC = self._load(key)
            if rows_LC is None:
                missing[key] = prompt
            else:
                found[key] = rows_LC
        todo = list(missing.items())
        encoder = self.encoder if todo else None
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for (key, _), rows_LC in zip(chunk, encoder.encode_rows([p for _, p in chunk])):
                save_torch_atomic(self.path(key), {"key": key, "features_LC": rows_LC.contiguous()})
                found[key] = rows_LC
        return [found[k] for k in keys]

    def features(self, prompts: list[str]) -> TextFeatures:
        return TextFeatures.from_rows(self.rows(prompts))
