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
from pathlib import Path

import torch

from varq.atomic import read_or_heal, save_torch_atomic
from varq.text.encoder import TextEncoder, TextFeatures

CACHE_SUBDIR = "text_features"


def encoder_fingerprint(encoder: TextEncoder) -> dict:
    """Everything besides the prompt that determines an encoding."""
    return {"encoder": encoder.identity, "max_length": encoder.max_length, "dtype": str(encoder.dtype).split(".")[-1]}


def feature_key(prompt: str, fingerprint: dict) -> str:
    text = json.dumps({"prompt": prompt, **fingerprint}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """``features(prompts)`` → ``TextFeatures``, encoding only the prompts not stored yet."""

    def __init__(self, root: str | Path, encoder: TextEncoder, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1")
        self.folder = Path(root) / CACHE_SUBDIR
        self.encoder = encoder
        self.batch_size = batch_size
        self.fingerprint = encoder_fingerprint(encoder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def _load(self, key: str) -> torch.Tensor | None:
        def check(entry: dict) -> None:
            rows_LC = entry["features_LC"]
            if entry.get("key") != key:
                raise ValueError("stored key differs from the file name")
            if not isinstance(rows_LC, torch.Tensor) or rows_LC.dim() != 2:
                raise ValueError("features are not a 2-D tensor")
            if rows_LC.dtype != self.encoder.dtype or rows_LC.shape[1] != self.encoder.width:
                raise ValueError(f"features {rows_LC.dtype} × {rows_LC.shape[1]} do not match the encoder")
            if not 1 <= rows_LC.shape[0] <= self.encoder.max_length:
                raise ValueError(f"{rows_LC.shape[0]} tokens outside [1, {self.encoder.max_length}]")

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
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for (key, _), rows_LC in zip(chunk, self.encoder.encode_rows([p for _, p in chunk])):
                save_torch_atomic(self.path(key), {"key": key, "features_LC": rows_LC.contiguous()})
                found[key] = rows_LC
        return [found[k] for k in keys]

    def features(self, prompts: list[str]) -> TextFeatures:
        return TextFeatures.from_rows(self.rows(prompts))
