"""Typed run configuration: each Hydra group is validated against a dataclass at start-up.

YAML under ``varq/conf/`` is the only place defaults live; these schemas say which keys exist and what type they
have, so a misspelled key or a wrong type fails before any model is built. This module imports nothing from varq:
what needs the method registry (the quant group's dataclass, the calib column) lives in ``varq.compose``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

SUPPORTED_BITS = ("w8a8", "w6a6", "w4a8", "w4a6", "w4a4")
# Infinity's scale schedules exist for these pixel budgets (0.06M = 256², 0.25M = 512², 1M = 1024² at 1:1) and
# height/width templates (8 ratios ≥ 1 and their inverses, truncated to three decimals as upstream does).
T2I_RESOLUTIONS = ("0.06M", "0.25M", "0.60M", "1M")
T2I_ASPECT_RATIOS = (0.333, 0.4, 0.5, 0.571, 0.666, 0.75, 0.8, 1.0, 1.25, 1.333, 1.5, 1.75, 2.0, 2.5, 3.0)
TEXT_DTYPES = ("auto", "fp16", "bf16", "fp32")
# How quantized Linears compute: fake (fp32 fake quantization, every method) | fp8 (e4m3 GEMMs, varq.quant.fp8)
BACKENDS = ("fake", "fp8")
DEFAULT_BACKEND = "fake"


class ConfigError(ValueError):
    """A configuration problem found at start-up; the message says which key to set."""


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    quant_resi: float = 0.5
    share_quant_resi: int = 4


@dataclass
class ModelConfig:
    name: str = "var_digits"
    # which model family (its adapter is varq/models/<family>_adapter.py): var (class-conditional VAR) | infinity
    # (text-to-image bitwise VAR; `name` is then one of its sizes, and depth/width/patch_nums/vae below are unused)
    family: str = "var"
    # where weights come from: "official" (var_d*.pth + vae_ch160v4096z32.pth), "asset" (shipped with varq),
    # "random" (strong random weights; tests and throughput benchmarks only)
    source: str = "asset"
    depth: int = 16
    width: int | None = None  # None: 64·depth, as in the official models
    num_heads: int | None = None  # None: depth
    num_classes: int = 1000
    patch_nums: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    image_size: int = 256
    vae: VQVAEConfig = field(default_factory=VQVAEConfig)
    ckpt: str | None = None  # VAR weights (local .pth/.safetensors); None: look in ckpt_dir / the hub
    vae_ckpt: str | None = None
    ckpt_dir: str | None = None  # folder holding var_d{depth}.pth and vae_ch160v4096z32.pth
    hub_repo: str | None = "FoundationVision/var"  # tried only when the files are not found locally
    # Reconstruction budget for methods that reconstruct (brecq, ours): None keeps each method's paper value
    # (5000 iterations at lr 1e-4, tuned for VAR-d16…d30); a small model sets a budget that fits a CPU, with the
    # learning rate scaled so AdaRound's α can move as far as in the paper's schedule (var_digits).
    recon_iters: int | None = None
    recon_lr: float | None = None
    feature_extractor: str = "inception"  # varq-digits | inception
    reference: str = "imagenet256"  # reference statistics for FID: var_digits | imagenet256
    # Text encoder of text-to-image models (varq.text). A local folder (clusters without internet), a hub id such as
    # google/flan-t5-xl, or "random" (a small random T5 for tests; its width is text_random_width). None: no text.
    text_encoder: str | None = None
    text_tokenizer: str | None = None  # None: the tokenizer files sit next to the encoder's
    text_encoder_revision: str | None = None  # hub commit/tag; pin it so the feature cache key names fixed weights
    text_max_length: int = 512  # tokens per prompt after truncation (Infinity: 512)
    text_dtype: str = "auto"  # auto: fp16 on CUDA (as the official inference), fp32 on CPU | fp16 | bf16 | fp32
    text_random_width: int = 256  # d_model of text_encoder=random
    # Quantized (explicit) attention processes this many query rows at a time, so the (B, H, L, S) attention matrix is
    # never whole (Infinity at 1024²: 5.5 GB per layer in fp32); None: all rows at once. Same results (shift-and-sum's
    # per-key importance is then a sum of chunk sums: equal up to the last bit).
    attn_query_chunk: int | None = None


@dataclass
class EvalConfig:
    name: str = "smoke"
    samples_per_class: int = 1
    classes: list[int] | None = None  # None: every class
    batch_size: int = 16
    seed: int = 0  # batch b uses generator seed seed + b
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False
    dtype: str = "fp32"  # fp32 | fp16 | bf16 (autocast)
    # compiled dynamic per-token quantizers (varq.quant.fused): the same numbers, faster after a one-time compile
    fused_quantizers: bool = False
    # VQ-VAE decoder: reference (the official arithmetic) | fast (channels_last, upsample convs at the low resolution:
    # equal up to fp32 rounding, so a non-default value is part of the run id; varq.models.fast_decoder) | winograd
    # (fast, plus the 3×3 convs as Winograd F(4×4, 3×3) on the CPU; varq.models.winograd)
    decoder: str = "reference"
    num_shards: int = 1  # generation can fan out over workers; shard k takes batches b with b % num_shards == k
    metrics: list[str] = field(default_factory=lambda: ["inception_score", "fid", "fid2fp16"])
    inception_weights: str | None = None  # torch-fidelity inception-v3-compat weights (offline clusters)
    reference_npz: str | None = None  # ImageNet: VIRTUAL_imagenet256_labeled.npz (ADM reference batch)
    grid_images: int = 64
    # Text-to-image protocol (read only when prompts is set; varq.text.prompts). cfg and top_p above apply too.
    prompts: str | None = None  # a shipped set (varq_prompts) or a .txt / .csv / .json prompt file
    prompts_column: str | None = None  # csv/json: the column holding the prompt (None: "prompt", COCO: "caption")
    num_prompts: int | None = None  # the first N prompts of the file (None: all)
    seeds_per_prompt: int = 1  # sample j of a prompt uses seed seed + j
    tau: float = 1.0  # sampling temperature of the bitwise logits
    resolution: str = "1M"  # pixel budget of the scale schedule: one of T2I_RESOLUTIONS
    aspect_ratio: float = 1.0  # height / width: one of T2I_ASPECT_RATIOS
    clip_weights: str | None = None  # a transformers CLIP folder; None: clip_score is reported as missing


@dataclass
class BitsConfig:
    name: str = "w4a4"
    w_bits: int = 4
    a_bits: int = 4


@dataclass
class DGCConfig:
    """Options of calib=dgc (PTQ4ARVG's distribution-guided calibration); validated by varq.calib.dgc."""

    selection: str = "ratio"  # ratio (the released code) | distance (the top-ranked sequences themselves)
    feature: str = "sink"  # sink: last block, token 0, unmasked pass (released) | mean: masked pass, token mean
    top_p: float | None = 0.95  # None: the eval's top-p; the released code used 0.95
    dtype: str | None = "fp32"  # generation dtype; None: the eval's (the released code generates in fp32)
    n_keep: int | None = None  # sequences kept; None: n_images
    atol: float = 1e-3  # distances this close in both groups count as a tie (ratio 0.5)


@dataclass
class CalibConfig:
    name: str = "random"
    n_images: int = 32  # calibration generations (resample: distinct classes)
    seed: int = 1234  # different from the evaluation seeds on purpose
    batch_size: int = 16
    class_draw: str = "numpy"  # resample / distinct: numpy (released np.random.choice) | torch (randperm)
    dgc: DGCConfig = field(default_factory=DGCConfig)


TASKS = ("class_cond", "inpaint", "outpaint", "edit")


@dataclass
class TaskConfig:
    name: str = "class_cond"  # class_cond | inpaint | outpaint | edit (varq.sample.tasks)
    # The keys below are read only by inpaint / outpaint / edit.
    box: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.8, 0.8])  # [y0, x0, y1, x1] in [0, 1] (VAR demo)
    per_class: int = 10  # input images per class: the first ones of each class in a fixed order
    edit_shift: int = 1  # edit: target class = (true class + edit_shift) % num_classes
    images_dir: str | None = None  # ImageNet val, one sub-folder per class; None: the digits test split

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task.name={self.name!r}; choose one of {', '.join(TASKS)}")
        y0, x0, y1, x1 = self.box if len(self.box) == 4 else (None,) * 4
        if y0 is None or not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
            raise ValueError(f"task.box={list(self.box)} must be [y0, x0, y1, x1], 0 ≤ y0 < y1 ≤ 1, 0 ≤ x0 < x1 ≤ 1")
        if self.per_class < 1:
            raise ValueError(f"task.per_class={self.per_class} must be ≥ 1")


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    mode: str = "offline"  # offline | online | disabled
    project: str = "varq"
    entity: str | None = None
    group: str | None = None  # None: <model>/<eval>/<task>
    tags: list[str] = field(default_factory=list)  # added to model:…, quant:…, bits:…, calib:…, seed:…
    artifacts: list[str] = field(default_factory=list)  # W&B artifacts to upload: quantizer_state, samples


@dataclass
class PathsConfig:
    root: str = "runs"  # run directories: <root>/<model>/<run name>
    # shared artifacts: FP16 reference samples, reference statistics, calibration sets (conf: ${paths.root}/cache)
    cache: str = "runs/cache"


@dataclass
class RunConfig:
    model: ModelConfig
    eval: EvalConfig
    quant: Any  # the method's dataclass (validated through the method registry)
    bits: BitsConfig
    calib: CalibConfig
    task: TaskConfig
    logger: LoggerConfig
    paths: PathsConfig
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fake: the method's fake quantizers; fp8: its Linears as FP8 (e4m3) GEMMs where the scheme allows (a run of
    # its own: W8A8 becomes the e4m3 quantizer, W4A4 integer codes differ by one fp32 rounding)
    backend: str = DEFAULT_BACKEND
    # CPU runs only: glibc keeps freed memory for reuse instead of returning every large block to the OS, so new
    # activations stop page-faulting (varq.sample.cpu_memory). The same numbers; false: the system allocator's default
    reuse_freed_memory: bool = True

    @property
    def quant_name(self) -> str:
        return self.quant.name

    @property
    def bits_label(self) -> str:
        """Row value of the bits column: 'fp16' for the unquantized reference."""
        return "fp16" if self.quant.name == "fp16" else self.bits.name


def bits_label(w_bits: int, a_bits: int) -> str:
    return f"w{w_bits}a{a_bits}"


def check_bits(bits: BitsConfig) -> None:
    """The label in rows and run directories must be what ran: the name equals the numbers and is supported.
    The option files derive their name from the numbers, so overriding the numbers relabels the run."""
    derived = bits_label(bits.w_bits, bits.a_bits)
    if bits.name != derived:
        raise ConfigError(
            f"bits.name={bits.name!r} does not match bits.w_bits={bits.w_bits} bits.a_bits={bits.a_bits} ({derived}); "
            f"select a bit-width with bits=<option> (one of {', '.join(SUPPORTED_BITS)}) instead of setting "
            "bits.name by hand")
    if bits.name not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits.name} (bits.w_bits={bits.w_bits}, bits.a_bits={bits.a_bits}) is not supported; "
                          f"choose one of {', '.join(SUPPORTED_BITS)}")


def typed_group(schema: type, node: Any, group: str) -> Any:
    """One Hydra group as its dataclass; a misspelled key or a wrong type is a ConfigError naming the group."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except Exception as err:  # omegaconf raises several error types; all mean "bad key or value"
        raise ConfigError(f"invalid '{group}' config: {err}") from None


def stable_hash(obj: Any, length: int = 10) -> str:
    """Short sha1 of a JSON-able object with sorted keys: equal configs give equal ids across machines."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]
