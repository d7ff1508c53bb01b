"""The digits classifier: varq's feature extractor for IS/FID of the embedded `var_digits` model.

A deliberately tiny CNN (≈ 58k parameters) on 32×32 grey images. Its logits give IS and the conditioned-class
accuracy of samples; its 128-d penultimate activations play the role of Inception's pool3 features for FID.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_CLASSIFIER_ASSET = "digits_classifier"
DIGITS_IMAGE_SIZE = 32
NUM_DIGIT_CLASSES = 10
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """B×3×H×W images (uint8 [0, 255] or float [-1, 1]) → logits B×10 / penultimate features B×128."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_DIGIT_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def preprocess(x_B3HW: torch.Tensor) -> torch.Tensor:
        """Any supported input → grey float B×1×32×32 in [-1, 1].

        uint8 means stored pixels; float means the model range [-1, 1] (what the VQ-VAE decodes), so samples can be
        classified before or after `to_uint8`. Channels are averaged because the digits are grey replicated to RGB.
        """
        if x_B3HW.dim() != 4 or x_B3HW.shape[1] not in (1, 3):
            raise ValueError(f"expected B×3×H×W (or B×1×H×W) images, got shape {tuple(x_B3HW.shape)}")
        if x_B3HW.dtype == torch.uint8:
            x_B3HW = x_B3HW.to(torch.float32) / 127.5 - 1.0
        x_B1HW = x_B3HW.to(torch.float32).mean(dim=1, keepdim=True)
        if x_B1HW.shape[-2:] != (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE):
            x_B1HW = F.interpolate(x_B1HW, size=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), mode="bilinear",
                                   align_corners=False)
        return x_B1HW

    def features(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(self.preprocess(x_B3HW))), 2)  # 16×16
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8×8
        h = F.relu(self.conv3(h))
        # A 2×2 pooled grid rather than global pooling: where strokes are matters for telling 6 from 9.
        h_B256 = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return F.relu(self.fc(h_B256))

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_B3HW))


def load_digits_classifier(assets_dir: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """The shipped classifier (checksum-verified), in eval mode without gradients."""
    from varq.models.assets import load_asset

    state_dict, meta = load_asset(DIGITS_CLASSIFIER_ASSET, assets_dir)
    model = DigitsClassifier(feature_dim=int(meta.get("feature_dim", FEATURE_DIM)))
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False)
