"""CLIP score of generated images against their prompts: mean over samples of 100 · max(cos(image, text), 0).

The definition is torchmetrics' ``CLIPScore`` (Hessel et al., 2021, with w = 100): image and text embeddings of a
CLIP model (``transformers`` ``CLIPModel``), L2-normalised, cosine per (image, prompt) pair, clipped at 0, scaled
by 100, averaged. Images go through the checkpoint's own ``CLIPImageProcessor`` (resize, centre crop, normalise);
prompts through its tokenizer, truncated to the text model's positions (77 for OpenAI's CLIP).

The weights are given by path (``eval.clip_weights``: a folder with config.json, weights, preprocessor_config.json
and tokenizer files, e.g. a download of openai/clip-vit-large-patch14). When they are not given the metric is
reported as missing: ``clip_score`` returns None and logs why, and the run goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CLIP_KEY = "eval.clip_weights"
CLIP_FILES = ("config.json", "preprocessor_config.json")


class ClipWeightsError(FileNotFoundError):
    """CLIP weights were configured but cannot be used; the message names the key."""


def clip_scores_from_embeddings(image_BD: torch.Tensor, text_BD: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score, 100 · max(cos, 0), in float64 (B,)."""
    if image_BD.shape != text_BD.shape or image_BD.dim() != 2:
        raise ValueError(f"image {tuple(image_BD.shape)} and text {tuple(text_BD.shape)} embeddings must both be (B, D)")
    image_BD = torch.nn.functional.normalize(image_BD.double(), dim=-1)
    text_BD = torch.nn.functional.normalize(text_BD.double(), dim=-1)
    return 100.0 * (image_BD * text_BD).sum(dim=-1).clamp(min=0)


def check_clip_weights(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ClipWeightsError(f"{CLIP_KEY}={path!r} is not a folder; point it at a transformers CLIP checkpoint "
                               "(e.g. a download of openai/clip-vit-large-patch14) or set it to null to skip clip_score")
    missing = [n for n in CLIP_FILES if not (folder / n).is_file()]
    if missing:
        raise ClipWeightsError(f"{CLIP_KEY}={path!r} lacks {', '.join(missing)}; point it at a full transformers CLIP "
                               "checkpoint folder (model, image processor and tokenizer files)")
    return folder


def _projected(output: Any) -> torch.Tensor:
    """transformers ≥ 5 returns the projected embedding as ``pooler_output``; older versions return the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipScorer:
    model: torch.nn.Module
    tokenizer: Any
    image_processor: Any

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> ClipScorer:
        folder = check_clip_weights(path)
        from varq.metrics.tvshim import ensure_torchvision

        ensure_torchvision()  # transformers' image processors import torchvision
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ClipWeightsError(f"{CLIP_KEY}={path!r} could not be loaded ({' '.join(str(err).split())[:200]}); "
                                   "point it at a transformers CLIP checkpoint folder") from None
        return cls(model.to(device).eval().requires_grad_(False), tokenizer, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embeddings(self, images_BCHW: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected image and text embeddings (B, D) of uint8 images (B, 3, H, W) and their prompts."""
        if images_BCHW.dtype != torch.uint8 or images_BCHW.dim() != 4 or images_BCHW.shape[1] != 3:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images_BCHW.dtype} {tuple(images_BCHW.shape)}")
        if len(prompts) != images_BCHW.shape[0]:
            raise ValueError(f"{images_BCHW.shape[0]} images but {len(prompts)} prompts")
        pixels = self.image_processor(images=[img.cpu() for img in images_BCHW], return_tensors="pt")["pixel_values"]
        max_tokens = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        image_BD = _projected(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        text_BD = _projected(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                          attention_mask=tokens["attention_mask"].to(self.device)))
        return image_BD.float().cpu(), text_BD.float().cpu()

    def scores(self, images_NCHW: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Per-sample CLIP scores (N,), float64."""
        out = [clip_scores_from_embeddings(*self.embeddings(images_NCHW[s : s + batch_size], prompts[s : s + batch_size]))
               for s in range(0, len(prompts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def clip_score(images_NCHW: torch.Tensor, prompts: list[str], weights: str | None, device: torch.device | str = "cpu",
               batch_size: int = 64) -> float | None:
    """Mean CLIP score of the images against their prompts, or None (logged) when no CLIP weights are given."""
    if not weights:
        log.warning("clip_score is reported as missing: %s is not set (point it at a transformers CLIP folder, "
                    "e.g. a download of openai/clip-vit-large-patch14)", CLIP_KEY)
        return None
    if len(prompts) == 0:
        log.warning("clip_score is reported as missing: no samples")
        return None
    scorer = ClipScorer.load(weights, device)
    return float(scorer.scores(images_NCHW, prompts, batch_size).mean())
