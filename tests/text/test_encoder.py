"""The T5 wrapper: real-token features equal an unpadded forward of each prompt alone, padding is zero, lengths
count the real tokens; missing files name the key to set."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.text.conftest import tiny_t5
from varq.text.encoder import (
    TextEncoderError,
    TextEncoderSpec,
    TextFeatures,
    byte_tokenizer,
    load_text_encoder,
    random_text_encoder,
    resolve_dtype,
)

PROMPTS = ["a red cat on the mat", "blue sky", "the dog over the house a cat"]


def test_features_are_the_real_tokens_of_each_prompt_alone(t5_dir):
    enc = load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16))
    feats = enc.encode(PROMPTS)
    assert feats.lengths_B.tolist() == [len(p.split()) + 1 for p in PROMPTS]  # words + </s>
    assert feats.features_BLC.shape == (3, max(feats.lengths_B), 32) and feats.features_BLC.dtype == torch.float32
    reference = tiny_t5()  # the same weights, run without the wrapper, one prompt at a time, no padding
    vocab = enc.tokenizer.get_vocab()
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([[vocab[w] for w in prompt.split()] + [1]])
        with torch.no_grad():
            alone_LC = reference(input_ids=ids).last_hidden_state[0]
        n = int(feats.lengths_B[i])
        torch.testing.assert_close(feats.features_BLC[i, :n], alone_LC, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(feats.features_BLC[i, n:]) == 0


def test_truncation_keeps_max_length_tokens(t5_dir):
    enc = load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=5))
    feats = enc.encode(["a red cat on the mat over the house", "cat"])
    assert feats.lengths_B.tolist() == [5, 2]
    ids_BL, mask_BL = enc.tokenize(["a red cat on the mat over the house"])
    assert ids_BL.shape == (1, 5) and ids_BL[0, -1] == 1  # </s> survives truncation
    assert mask_BL.sum() == 5


def test_packed_form_and_round_trip():
    rows = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(5, 4)]
    feats = TextFeatures.from_rows(rows)
    assert feats.features_BLC.shape == (3, 5, 4)
    assert feats.cu_seqlens().tolist() == [0, 3, 4, 9] and feats.cu_seqlens().dtype == torch.int32
    for got, want in zip(feats.rows(), rows):
        assert torch.equal(got, want)
    assert torch.equal(feats.packed_LC(), torch.cat(rows))
    with pytest.raises(ValueError):
        TextFeatures(torch.zeros(2, 3, 4), torch.tensor([1, 2, 3]))


def test_dtype_auto_is_fp16_on_cuda_fp32_on_cpu(t5_dir):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="model.text_dtype"):
        resolve_dtype("fp8", "cpu")
    enc = load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16, dtype="bf16"))
    assert enc.dtype == torch.bfloat16
    rows = enc.encode_rows(PROMPTS)
    assert all(r.dtype == torch.bfloat16 for r in rows)
    assert enc.encode(PROMPTS).features_BLC.dtype == torch.float32


def test_missing_encoder_folder_names_the_key(tmp_path):
    with pytest.raises(TextEncoderError, match="model.text_encoder=.*without internet"):
        load_text_encoder(TextEncoderSpec(str(tmp_path / "nowhere")))


def test_missing_weights_or_tokenizer_names_the_key(t5_dir, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(t5_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(TextEncoderError, match="model.text_encoder=.*no weights"):
        load_text_encoder(TextEncoderSpec(str(no_weights)))
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(t5_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(TextEncoderError, match="no tokenizer.*model.text_tokenizer"):
        load_text_encoder(TextEncoderSpec(str(no_tok)))
    # the tokenizer may live apart: then its own key is named, and a good one makes the folder usable
    with pytest.raises(TextEncoderError, match="model.text_tokenizer=.*no tokenizer"):
        load_text_encoder(TextEncoderSpec(str(no_tok), tokenizer=str(tmp_path)))
    enc = load_text_encoder(TextEncoderSpec(str(no_tok), tokenizer=str(t5_dir), max_length=16))
    assert enc.encode(["a cat"]).lengths_B.tolist() == [3]
    assert "tokenizer" in enc.identity


def test_unreachable_hub_id_names_the_key(monkeypatch):
    from transformers import AutoTokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(TextEncoderError, match="model.text_encoder='google/flan-t5-xl'.*without internet"):
        load_text_encoder(TextEncoderSpec("google/flan-t5-xl"))


def test_local_identity_follows_file_content(t5_dir, tmp_path):
    first = load_text_encoder(TextEncoderSpec(str(t5_dir), max_length=16)).identity
    assert set(first["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    other = tmp_path / "other"
    tiny_t5(seed=1).save_pretrained(other)
    shutil.copy(t5_dir / "tokenizer.json", other)
    shutil.copy(t5_dir / "tokenizer_config.json", other)
    second = load_text_encoder(TextEncoderSpec(str(other), max_length=16)).identity
    assert second["files"]["model.safetensors"] != first["files"]["model.safetensors"]
    assert second["files"]["tokenizer.json"] == first["files"]["tokenizer.json"]


def test_random_encoder_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = random_text_encoder(24, max_length=32, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = random_text_encoder(24, max_length=32, seed=3)
    c = random_text_encoder(24, max_length=32, seed=4)
    fa, fb, fc = (e.encode(["a small house", "a small mouse"]) for e in (a, b, c))
    assert torch.equal(fa.features_BLC, fb.features_BLC)
    assert not torch.equal(fa.features_BLC, fc.features_BLC)
    assert not torch.equal(fa.features_BLC[0], fa.features_BLC[1])  # one letter apart → other features
    assert fa.features_BLC.shape[-1] == 24 and a.identity != c.identity


def test_byte_tokenizer_covers_any_text():
    tok = byte_tokenizer(max_length=64)
    text = "café – 東京 #1"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) + 1 and ids[-1] == 1
    assert 2 not in ids  # no <unk>: every byte has a token
    assert tok.decode(ids, skip_special_tokens=True) == text
