"""The prompt-feature cache: a second call encodes nothing and returns the same bits; only missing prompts are
encoded; the key follows prompt, encoder, max_length and dtype; damaged files are moved aside and rebuilt."""

from __future__ import annotations

import pytest
import torch

from varq.atomic import CORRUPT_SUFFIX
from varq.text.cache import TextFeatureCache, encoder_fingerprint, feature_key
from varq.text.encoder import TextEncoderSpec, load_text_encoder

PROMPTS = ["a red cat", "the blue sky over the house", "a dog on a mat"]


@pytest.fixture
def encoder(t5_dir):
    return load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16))


def count_calls(monkeypatch, encoder) -> list[list[str]]:
    calls: list[list[str]] = []
    original = encoder.encode_rows

    def counted(prompts):
        calls.append(list(prompts))
        return original(prompts)

    monkeypatch.setattr(encoder, "encode_rows", counted)
    return calls


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_second_call_reads_identical_bits_without_encoding(t5_dir, tmp_path, monkeypatch, dtype):
    encoder = load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16, dtype=dtype))
    fresh = encoder.encode(PROMPTS)
    calls = count_calls(monkeypatch, encoder)
    first = TextFeatureCache(tmp_path / "cache", encoder, batch_size=2).features(PROMPTS)
    assert calls == [PROMPTS[:2], PROMPTS[2:]]  # misses encoded in batches of 2
    second = TextFeatureCache(tmp_path / "cache", encoder).features(PROMPTS)  # a new sweep point, same folder
    assert len(calls) == 2
    for got in (first, second):
        assert torch.equal(got.features_BLC, fresh.features_BLC)
        assert torch.equal(got.lengths_B, fresh.lengths_B)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 3


def test_only_missing_prompts_are_encoded_once(encoder, tmp_path, monkeypatch):
    cache = TextFeatureCache(tmp_path, encoder)
    cache.features(PROMPTS[:2])
    calls = count_calls(monkeypatch, encoder)
    feats = cache.features([PROMPTS[1], PROMPTS[2], PROMPTS[1], PROMPTS[2]])
    assert calls == [[PROMPTS[2]]]
    assert torch.equal(feats.features_BLC[0], feats.features_BLC[2])
    assert torch.equal(feats.features_BLC, encoder.encode([PROMPTS[1], PROMPTS[2]] * 2).features_BLC)


def test_key_follows_prompt_encoder_length_and_dtype(t5_dir):
    base = load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16))
    fp = encoder_fingerprint(base)
    variants = [
        feature_key("a red cat", fp),
        feature_key("a red cat ", fp),
        feature_key("a red cat", encoder_fingerprint(load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=8)))),
        feature_key("a red cat", encoder_fingerprint(load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16,
                                                                                         dtype="bf16")))),
        feature_key("a red cat", {**fp, "encoder": {"hub": "google/flan-t5-xl", "revision": "abc"}}),
    ]
    assert len(set(variants)) == len(variants)
    assert feature_key("a red cat", encoder_fingerprint(load_text_encoder(TextEncoderSpec(str(t5_dir),
                                                                                          max_length=16)))) == variants[0]


def test_damaged_file_is_moved_aside_and_rebuilt(encoder, tmp_path, monkeypatch):
    cache = TextFeatureCache(tmp_path, encoder)
    want = cache.features(PROMPTS)
    damaged = cache.path(feature_key(PROMPTS[1], cache.fingerprint))
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated by a killed job
    calls = count_calls(monkeypatch, encoder)
    got = TextFeatureCache(tmp_path, encoder).features(PROMPTS)
    assert calls == [[PROMPTS[1]]]
    assert torch.equal(got.features_BLC, want.features_BLC)
    assert damaged.with_name(damaged.name + CORRUPT_SUFFIX).is_file() and damaged.is_file()


def test_foreign_or_mismatched_file_is_rebuilt(encoder, tmp_path, monkeypatch):
    cache = TextFeatureCache(tmp_path, encoder)
    want = cache.features(PROMPTS[:1])
    path = cache.path(feature_key(PROMPTS[0], cache.fingerprint))
    torch.save({"key": "another", "features_LC": torch.zeros(4, 32)}, path)  # readable, but not this prompt's
    calls = count_calls(monkeypatch, encoder)
    assert torch.equal(cache.features(PROMPTS[:1]).features_BLC, want.features_BLC)
    assert calls == [[PROMPTS[0]]]
    key = feature_key(PROMPTS[0], cache.fingerprint)
    torch.save({"key": key, "features_LC": torch.zeros(4, 16)}, path)  # wrong width
    assert torch.equal(cache.features(PROMPTS[:1]).features_BLC, want.features_BLC)
    assert len(calls) == 2


@pytest.mark.parametrize("source", ["local", "random"])
def test_spec_fingerprint_equals_the_loaded_encoders(t5_dir, tmp_path, source):
    spec = TextEncoderSpec(str(t5_dir) if source == "local" else "random", max_length=16, random_width=24)
    cache = TextFeatureCache.for_spec(tmp_path, spec)
    assert cache.fingerprint == encoder_fingerprint(load_text_encoder(spec))
    assert cache.width == (32 if source == "local" else 24)


def test_cached_sweep_points_never_load_the_encoder(t5_dir, tmp_path, monkeypatch):
    import varq.text.cache as cache_module

    loads: list[TextEncoderSpec] = []

    def counted(spec, device="cpu", cache_dir=None):
        loads.append(spec)
        return load_text_encoder(spec, device, cache_dir)

    monkeypatch.setattr(cache_module, "load_text_encoder", counted)
    spec = TextEncoderSpec(str(t5_dir), max_length=16)
    first = TextFeatureCache.for_spec(tmp_path, spec).features(PROMPTS)
    assert len(loads) == 1
    second = TextFeatureCache.for_spec(tmp_path, spec).features(PROMPTS)
    assert len(loads) == 1  # every prompt was stored: the encoder stays on disk
    assert torch.equal(first.features_BLC, second.features_BLC)
    assert torch.equal(second.features_BLC, load_text_encoder(spec).encode(PROMPTS).features_BLC)
    TextFeatureCache.for_spec(tmp_path, spec).features(PROMPTS + ["a new dog"])
    assert len(loads) == 2
