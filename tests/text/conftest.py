"""A tiny random T5 encoder saved to disk with a word-level tokenizer built here: no download, a few KB."""

from __future__ import annotations

import pytest
import torch

WORDS = ["a", "red", "cat", "on", "mat", "dog", "blue", "sky", "the", "over", "house"]


def word_tokenizer(max_length: int = 16):
    """T5's conventions (<pad> = 0, </s> = 1 appended, <unk> = 2) over a fixed word list."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5(seed: int = 0):
    from varq.metrics.tvshim import ensure_torchvision

    ensure_torchvision()
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


@pytest.fixture
def t5_dir(tmp_path):
    """Folder with config.json, model.safetensors, tokenizer.json: what a local Flan-T5 download looks like."""
    folder = tmp_path / "tiny-t5"
    tiny_t5().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
