"""The text side of text-to-image models: a T5 encoder (through ``transformers``) that turns prompts into the
per-token features a model's cross-attention reads.

Infinity conditions on Flan-T5-XL: prompts are tokenized to ``max_length`` (512) with padding to that length, the
encoder runs in fp16 on CUDA, and only the real tokens' features are kept (the closing ``</s>`` included, padding
dropped). ``TextFeatures`` carries them padded to the longest prompt of the batch, with per-row lengths: the form
a model with a key mask (or a packed varlen kernel, via ``cu_seqlens``) consumes.

The encoder is named by ``model.text_encoder``: a local folder (clusters without internet), a hub id, or
``random`` (a small random T5 with a byte-level tokenizer, for tests and random-weight models; no download).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENCODER_KEY = "model.text_encoder"
TOKENIZER_KEY = "model.text_tokenizer"
RANDOM_SOURCE = "random"
RANDOM_LAYERS = 2
OFFLINE_HINT = ("clusters without internet set a local folder (e.g. a download of google/flan-t5-xl: config.json, "
                "*.safetensors, tokenizer files)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# Files that determine the features: hashed into the encoder's identity (the feature-cache key)
IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TextEncoderError(FileNotFoundError):
    """The encoder or its tokenizer cannot be found or loaded; the message names the key to set."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """Where the encoder comes from and how it runs (the ``model.text_*`` keys)."""

    source: str  # local folder, hub id, or "random"
    tokenizer: str | None = None  # None: next to the encoder
    revision: str | None = None  # hub only
    max_length: int = 512
    dtype: str = "auto"  # auto | fp16 | bf16 | fp32
    random_width: int = 256  # d_model of source=random
    random_seed: int = 0

    @classmethod
    def from_model_config(cls, model: Any) -> TextEncoderSpec:
        if model.text_encoder is None:
            raise TextEncoderError(f"{ENCODER_KEY} is not set: a text-to-image model needs its T5 encoder; set "
                                   f"{ENCODER_KEY}=google/flan-t5-xl or a local folder ({OFFLINE_HINT})")
        return cls(source=model.text_encoder, tokenizer=model.text_tokenizer, revision=model.text_encoder_revision,
                   max_length=model.text_max_length, dtype=model.text_dtype, random_width=model.text_random_width)


@dataclass
class TextFeatures:
    """Encoded prompts: features of the real tokens, zero-padded to the longest row, and each row's length."""

    features_BLC: torch.Tensor  # float32, rows[i, lengths[i]:] == 0
    lengths_B: torch.Tensor  # int64

    def __post_init__(self) -> None:
        if self.features_BLC.dim() != 3 or self.lengths_B.shape != self.features_BLC.shape[:1]:
            raise ValueError(f"features {tuple(self.features_BLC.shape)} and lengths {tuple(self.lengths_B.shape)} "
                             "must be (B, L, C) and (B,)")

    def __len__(self) -> int:
        return self.features_BLC.shape[0]

    def rows(self) -> list[torch.Tensor]:
        """Row i as its (lengths[i], C) real-token features."""
        return [self.features_BLC[i, : int(n)] for i, n in enumerate(self.lengths_B.tolist())]

    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative lengths (B+1,) int32, as packed varlen attention kernels take them."""
        return torch.nn.functional.pad(self.lengths_B.cumsum(0), (1, 0)).to(torch.int32)

    def packed_LC(self) -> torch.Tensor:
        """All real tokens, row after row: (sum(lengths), C)."""
        return torch.cat(self.rows(), dim=0)

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures(self.features_BLC.to(device), self.lengths_B.to(device))

    @classmethod
    def from_rows(cls, rows: list[torch.Tensor]) -> TextFeatures:
        """Stack (L_i, C) rows into the padded form; rows are cast to float32 (exact from fp16/bf16)."""
        if not rows:
            raise ValueError("no rows to stack")
        width = rows[0].shape[1]
        lengths_B = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
        features_BLC = torch.zeros(len(rows), int(lengths_B.max()), width, dtype=torch.float32)
        for i, r in enumerate(rows):
            features_BLC[i, : r.shape[0]] = r.float()
        return cls(features_BLC, lengths_B)


@dataclass
class TextEncoder:
    """A T5 encoder and its tokenizer; ``encode(prompts)`` gives ``TextFeatures``."""

    model: torch.nn.Module
    tokenizer: Any
    max_length: int
    identity: dict = field(default_factory=dict)  # what determines the features (the feature-cache key)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, (B, max_length) each. Padding to max_length as the official code does, so
        a prompt's features never depend on which other prompts share its batch."""
        tokens = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def encode_rows(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's real-token features (L_i, C) in the encoder's dtype (what the cache stores)."""
        if not prompts:
            return []
        ids_BL, mask_BL = self.tokenize(prompts)
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        hidden_BLC = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        lengths = mask_BL.sum(dim=-1).tolist()
        return [hidden_BLC[i, :n].detach().cpu().clone() for i, n in enumerate(lengths)]

    def encode(self, prompts: list[str]) -> TextFeatures:
        return TextFeatures.from_rows(self.encode_rows(prompts))


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """auto: fp16 on CUDA (the official inference precision of the T5 encoder), fp32 on CPU (fp16 matmuls there
    are slow and not what a reference run would use)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.text_dtype={name!r} is invalid: choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def is_local_source(source: str) -> bool:
    """A folder on disk (existing, or written like a path) rather than a hub id such as ``google/flan-t5-xl``."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1


def check_local_files(spec: TextEncoderSpec) -> None:
    """For a local encoder (and tokenizer), the files loading needs; raises TextEncoderError naming the key.
    A hub id is not checked here (it is resolved at load time)."""
    if spec.source == RANDOM_SOURCE:
        return
    if is_local_source(spec.source):
        folder = Path(spec.source).expanduser()
        if not folder.is_dir():
            raise TextEncoderError(f"{ENCODER_KEY}={spec.source!r} is not a folder; set {ENCODER_KEY} to the T5 "
                                   f"encoder's folder; {OFFLINE_HINT}")
        if not (folder / "config.json").is_file():
            raise TextEncoderError(f"{ENCODER_KEY}={spec.source!r} has no config.json; set {ENCODER_KEY} to the "
                                   f"folder of a transformers T5 checkpoint; {OFFLINE_HINT}")
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise TextEncoderError(f"{ENCODER_KEY}={spec.source!r} holds no weights ({', '.join(WEIGHT_FILES)}); set "
                                   f"{ENCODER_KEY} to a folder with the encoder weights; {OFFLINE_HINT}")
    tok_source = spec.tokenizer or spec.source
    key = TOKENIZER_KEY if spec.tokenizer else ENCODER_KEY
    if is_local_source(tok_source):
        folder = Path(tok_source).expanduser()
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise TextEncoderError(f"{key}={tok_source!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); set "
                                   f"{TOKENIZER_KEY} to the tokenizer's folder; {OFFLINE_HINT}")


def _file_identity(folder: Path, cache_dir: str | None) -> dict[str, str]:
    from varq.identity import file_sha256

    names = list(IDENTITY_FILES) + [n for n in WEIGHT_FILES if (folder / n).is_file()]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():  # sharded weights: the shards named by the index
            import json

            names += sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    return {n: file_sha256(folder / n, cache_dir) for n in dict.fromkeys(names) if (folder / n).is_file()}


def load_text_encoder(spec: TextEncoderSpec, device: torch.device | str = "cpu",
                      cache_dir: str | None = None) -> TextEncoder:
    """The encoder named by ``spec`` on ``device`` in eval mode. ``cache_dir`` keeps file hashes between runs."""
    dtype = resolve_dtype(spec.dtype, device)
    if spec.source == RANDOM_SOURCE:
        return random_text_encoder(spec.random_width, spec.max_length, seed=spec.random_seed, device=device,
                                   dtype=dtype)
    check_local_files(spec)
    from varq.metrics.tvshim import ensure_torchvision

    ensure_torchvision()  # transformers imports torchvision when it is installed
    from transformers import AutoTokenizer, T5EncoderModel

    tok_source = spec.tokenizer or spec.source
    tok_key = TOKENIZER_KEY if spec.tokenizer else ENCODER_KEY
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(tok_source).expanduser()) if is_local_source(tok_source)
                                                  else tok_source, revision=spec.revision,
                                                  local_files_only=is_local_source(tok_source))
    except (OSError, ValueError) as err:
        raise TextEncoderError(f"{tok_key}={tok_source!r}: the tokenizer could not be loaded ({_short(err)}); set "
                               f"{TOKENIZER_KEY} to a folder with tokenizer.json or spiece.model; {OFFLINE_HINT}") from None
    local = is_local_source(spec.source)
    try:
        model = T5EncoderModel.from_pretrained(str(Path(spec.source).expanduser()) if local else spec.source,
                                               revision=spec.revision, local_files_only=local, dtype=dtype)
    except (OSError, ValueError) as err:
        raise TextEncoderError(f"{ENCODER_KEY}={spec.source!r}: the T5 encoder could not be loaded ({_short(err)}); "
                               f"set {ENCODER_KEY} to a reachable hub id or a local folder; {OFFLINE_HINT}") from None
    model = model.to(device).eval().requires_grad_(False)
    identity = static_identity(spec, cache_dir)
    if identity is None:  # an unpinned hub id: transformers records the commit it resolved
        identity = {"hub": spec.source, "revision": getattr(model.config, "_commit_hash", None)}
    return TextEncoder(model, tokenizer, spec.max_length, identity)


def static_identity(spec: TextEncoderSpec, cache_dir: str | None = None) -> dict | None:
    """What determines the encoder's features, known without loading it: the random seed and shape, the hashes of a
    local folder's files, or a hub id with its pinned revision. None for a hub id without a revision (only loading
    tells which commit it is)."""
    if spec.source == RANDOM_SOURCE:
        return {"random": spec.random_seed, "width": spec.random_width, "layers": RANDOM_LAYERS, "tokenizer": "bytes"}
    if is_local_source(spec.source):
        identity: dict[str, Any] = {"files": _file_identity(Path(spec.source).expanduser(), cache_dir)}
    elif spec.revision:
        identity = {"hub": spec.source, "revision": spec.revision}
    else:
        return None
    if spec.tokenizer:
        identity["tokenizer"] = (_file_identity(Path(spec.tokenizer).expanduser(), cache_dir)
                                 if is_local_source(spec.tokenizer) else {"hub": spec.tokenizer})
    return identity


def static_width(spec: TextEncoderSpec) -> int | None:
    """d_model without loading the weights (random: its width; local: config.json); None for a hub id."""
    if spec.source == RANDOM_SOURCE:
        return spec.random_width
    config = Path(spec.source).expanduser() / "config.json"
    if is_local_source(spec.source) and config.is_file():
        import json

        return int(json.loads(config.read_text())["d_model"])
    return None


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def byte_tokenizer(max_length: int = 512):
    """An offline T5-style tokenizer: one token per UTF-8 byte, ``</s>`` appended, ``<pad>`` = 0 (vocabulary 259).
    Every prompt gets distinct ids, so a random encoder still tells prompts apart."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def random_t5_config(width: int, vocab_size: int = 259, layers: int = 2, heads: int = 2):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=width, d_kv=max(width // heads, 1), d_ff=2 * width,
                    num_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                    relative_attention_max_distance=32, feed_forward_proj="gated-gelu", pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)


def random_text_encoder(width: int, max_length: int = 512, seed: int = 0, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextEncoder:
    """A small random T5 encoder (gated-GELU as Flan-T5) with the byte tokenizer, fixed by ``seed``."""
    from varq.metrics.tvshim import ensure_torchvision

    ensure_torchvision()
    from transformers import T5EncoderModel

    config = random_t5_config(width, layers=RANDOM_LAYERS)
    state = torch.random.get_rng_state()
    try:  # a fixed seed without leaving the global RNG changed (building a model changes no global state)
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    finally:
        torch.random.set_rng_state(state)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    spec = TextEncoderSpec(RANDOM_SOURCE, max_length=max_length, random_width=width, random_seed=seed)
    return TextEncoder(model, byte_tokenizer(max_length), max_length, static_identity(spec))

