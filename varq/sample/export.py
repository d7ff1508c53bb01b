"""A run's samples as an ADM-style npz (``arr_0``: uint8 N×H×W×3, ``arr_1``: int64 labels), and sample sets back.

ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) and the tools built on it read exactly this
layout, so a varq run can be scored by them, and `load_sample_set` reads any of the three forms varq-eval accepts:
a run directory (its checksummed uint8 shards, in the run's own sample order), an npz, or a folder of images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from varq.atomic import atomic_write_bytes
from varq.sample.shards import ShardError, read_shard

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _samples_dir(run_dir: Path) -> Path:
    return run_dir / "samples" if (run_dir / "samples").is_dir() else run_dir


def load_run_samples(run_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N×3×H×W, labels N) of a run directory, in the order its metrics saw them.

    With the run's ``config.json`` the batch plan decides the order and every shard must be present and intact;
    a bare folder of ``batch_*.npz`` shards is read in index order (each shard's checksum is still verified).
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if config.is_file():
        from omegaconf import OmegaConf

        from varq.compose import to_run_config
        from varq.sample.generate import load_samples
        from varq.sample.tasks import build_task

        cfg = to_run_config(OmegaConf.create(json.loads(config.read_text())))
        return load_samples(cfg.eval, cfg.model.num_classes, _samples_dir(run_dir), task=build_task(cfg))
    shards = sorted(_samples_dir(run_dir).glob("batch_*.npz"))
    if not shards:
        raise FileNotFoundError(f"{run_dir} is not a varq run directory: no config.json and no samples/batch_*.npz")
    images, labels = zip(*(read_shard(p) for p in shards))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def write_adm_npz(path: str | Path, images_N3HW: torch.Tensor | np.ndarray, labels_N=None) -> Path:
    """Write ``arr_0`` (N×H×W×3 uint8) and, if given, ``arr_1`` (labels) atomically."""
    images = np.asarray(images_N3HW)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 N×3×H×W, got {images.dtype} {images.shape}")
    arrays = {"arr_0": np.ascontiguousarray(images.transpose(0, 2, 3, 1))}
    if labels_N is not None:
        arrays["arr_1"] = np.asarray(labels_N, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def export_run(run_dir: str | Path, out_path: str | Path) -> tuple[Path, int]:
    """Export a run's samples as an ADM-style npz; returns (path, number of images)."""
    images, labels = load_run_samples(run_dir)
    return write_adm_npz(out_path, images, labels), len(images)


def load_npz_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ADM-style npz (``arr_0`` uint8 N×H×W×3, optional ``arr_1`` labels) → (uint8 N×3×H×W, labels or None)."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0 (has {data.files}); expected ADM's layout: arr_0 uint8 N×H×W×3")
        arr = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 N×H×W×3, got {arr.dtype} {arr.shape}")
    if labels is not None and labels.shape != (len(arr),):
        raise ValueError(f"{path}: arr_1 must hold one label per image, got shape {labels.shape} for {len(arr)} images")
    images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def load_image_folder(folder: str | Path) -> torch.Tensor:
    """Every image in a folder (sorted by name), as RGB uint8 N×3×H×W; all must have the same size."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: images differ in size {sorted(sizes)}; resize them to one size first")
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))


def load_sample_set(source: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(uint8 N×3×H×W, labels or None, kind) of a run directory, an ADM-style npz or a folder of images."""
    source = Path(source)
    if source.is_file() and source.suffix == ".npz":
        return (*load_npz_samples(source), "npz")
    if source.is_dir():
        if (source / "config.json").is_file() or any(_samples_dir(source).glob("batch_*.npz")):
            try:
                return (*load_run_samples(source), "run")
            except ShardError as err:
                raise ValueError(f"{source}: {err} (rerun the run to regenerate it)") from None
        return load_image_folder(source), None, "folder"
    raise FileNotFoundError(f"{source} is neither an .npz file nor a folder (run directory or images)")
