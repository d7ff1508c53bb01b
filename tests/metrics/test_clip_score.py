"""CLIP score = mean of 100·max(cos(image, text), 0): checked by hand on fixed vectors and on a tiny random CLIP
built here (embeddings taken from the model directly); without weights it is reported as missing."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from varq.metrics.clip_score import ClipScorer, ClipWeightsError, clip_score, clip_scores_from_embeddings


def test_scores_from_embeddings_by_hand():
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[4.0, 3.0], [-1.0, 0.5], [2.0, 2.0]])
    # cos = 24/25; negative → 0; identical directions → 1
    want = [100 * 24 / 25, 0.0, 100.0]
    got = clip_scores_from_embeddings(image, text)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        clip_scores_from_embeddings(image, text[:2])


@pytest.fixture
def clip_dir(tmp_path):
    return tiny_clip(tmp_path)


def tiny_clip(tmp_path):
    """A tiny random transformers CLIP folder (model, byte tokenizer, image processor) under ``tmp_path/clip``."""
    from varq.metrics.tvshim import ensure_torchvision

    ensure_torchvision()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from varq.text.encoder import byte_tokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    byte_tokenizer(max_length=24).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_tiny_clip_matches_a_hand_computation(clip_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 40, 48), generator=gen, dtype=torch.uint8)
    prompts = ["a cat", "a dog on a mat", "sky", "a long prompt " * 10, "x"]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(clip_dir)(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, truncation=True, max_length=24,
                                                     return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**tokens)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    want = []
    for a, b in zip(img.double().tolist(), txt.double().tolist()):
        cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        want.append(100 * max(cos, 0.0))
    got = ClipScorer.load(str(clip_dir)).scores(images, prompts, batch_size=2)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-4)
    mean = clip_score(images, prompts, str(clip_dir))
    assert mean == pytest.approx(sum(want) / len(want), rel=1e-5, abs=1e-4)
    # pairs are kept: another prompt order gives another score
    assert clip_score(images, prompts[::-1], str(clip_dir)) != pytest.approx(mean, rel=1e-6)


def test_missing_weights_is_reported_not_raised(caplog):
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="varq.metrics.clip_score"):
        assert clip_score(images, ["a", "b"], None) is None
    assert "eval.clip_weights is not set" in caplog.text


def test_bad_weights_folder_and_inputs(clip_dir, tmp_path):
    with pytest.raises(ClipWeightsError, match="eval.clip_weights=.*is not a folder"):
        clip_score(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"], str(tmp_path / "nowhere"))
    (clip_dir / "preprocessor_config.json").unlink()
    with pytest.raises(ClipWeightsError, match="lacks preprocessor_config.json"):
        ClipScorer.load(str(clip_dir))


def test_images_must_be_uint8_and_paired(clip_dir):
    scorer = ClipScorer.load(str(clip_dir))
    with pytest.raises(ValueError, match="uint8"):
        scorer.embeddings(torch.zeros(1, 3, 32, 32), ["a"])
    with pytest.raises(ValueError, match="prompts"):
        scorer.embeddings(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a"])
