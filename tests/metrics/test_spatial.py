"""sFID: the tapped layer and layout (ADM: mixed_6/conv, 7 channels, NHWC), and the Fréchet formula on them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from varq.data.digits import load_digits_split
from varq.metrics.fidelity import evaluate, feature_stats, fid_from_stats, reference_from_images
from varq.metrics.spatial import SPATIAL_CHANNELS, SpatialTap, flatten_spatial


def _closed_form_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_flatten_keeps_first_seven_channels_in_hwc_order() -> None:
    map_BCHW = torch.arange(2 * 9 * 3 * 4, dtype=torch.float32).reshape(2, 9, 3, 4)
    flat = flatten_spatial(map_BCHW)
    assert flat.shape == (2, 3 * 4 * SPATIAL_CHANNELS)
    for b in range(2):
        for c in range(SPATIAL_CHANNELS):
            for h in range(3):
                for w in range(4):
                    assert flat[b, (h * 4 + w) * SPATIAL_CHANNELS + c] == map_BCHW[b, c, h, w]
    assert flatten_spatial(-map_BCHW, relu=True).abs().sum() == 0


def test_sfid_is_the_frechet_formula_on_spatial_features() -> None:
    gen = torch.Generator().manual_seed(0)
    a = flatten_spatial(torch.randn(300, 8, 2, 2, generator=gen))  # 28-d
    b = flatten_spatial(torch.randn(250, 8, 2, 2, generator=gen) * 1.2 + 0.3)
    sa, sb = feature_stats(a), feature_stats(b)
    expected = _closed_form_fid(a.double().numpy(), b.double().numpy())
    assert fid_from_stats(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"]) == pytest.approx(expected, rel=1e-6)


def _digits_conv3_features(images_u8: torch.Tensor) -> np.ndarray:
    """The digits classifier's conv3 map after ReLU, computed here layer by layer, first 7 channels, NHWC."""
    from varq.models.classifier import load_digits_classifier

    clf = load_digits_classifier()
    with torch.no_grad():
        h = F.max_pool2d(F.relu(clf.conv1(clf.preprocess(images_u8))), 2)
        h = F.max_pool2d(F.relu(clf.conv2(h)), 2)
        h = F.relu(clf.conv3(h))
    return h[:, :7].permute(0, 2, 3, 1).reshape(len(h), -1).double().numpy()


def test_digits_sfid_equals_closed_form_on_conv3_features() -> None:
    images, labels = load_digits_split("train", image_size=16)
    ref_images, samples = images[:800], images[800:1400]  # more images than the 448 dims: full-rank covariances
    reference = reference_from_images(ref_images, "varq-digits")
    assert reference["mu_s"].shape == (8 * 8 * 7,)
    got = evaluate(samples, labels[800:1400], extractor="varq-digits", reference=reference, metrics=["sfid"])
    expected = _closed_form_fid(_digits_conv3_features(samples), _digits_conv3_features(ref_images))
    assert got["sfid"] == pytest.approx(expected, rel=1e-5)
    assert "precision" not in got and "recall" not in got  # not asked for


def _random_inception_weights(path) -> str:
    """torch-fidelity's Inception with PyTorch's default init (its real weights cannot be downloaded offline)."""
    from varq.metrics.tvshim import ensure_torchvision

    ensure_torchvision()
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        state = Unloaded("inception-v3-compat", ["2048"]).state_dict()
    finally:
        fe.load_state_dict_from_url = original
    torch.save(state, path)
    return str(path)


def test_inception_spatial_features_are_mixed_6d_branch1x1(tmp_path) -> None:
    from varq.metrics.extractors import build_extractor, resolve_extractor

    spec = resolve_extractor("inception", inception_weights=_random_inception_weights(tmp_path / "w.pth"))
    model = build_extractor(spec)
    seen = {}
    handle = model.Mixed_6d.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].clone()))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), SpatialTap(model, spec.spatial_module, spec.spatial_relu) as tap:
        model(images)
        spatial = tap.take()
    handle.remove()
    assert spatial.shape == (2, 2023)  # ADM: 17 × 17 × 7
    with torch.no_grad():
        branch_BCHW = model.Mixed_6d.branch1x1(seen["x"])  # TF mixed_6/conv (post-ReLU)
    assert branch_BCHW.shape[1:] == (192, 17, 17) and (branch_BCHW >= 0).all()
    expected = branch_BCHW[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(spatial, expected)
