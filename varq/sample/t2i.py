"""Text-to-image generation as a task (``varq.sample.batches.GenerationTask``): prompts in, images out.

The plan is the eval protocol's prompt file (``eval.prompts``, the first ``eval.num_prompts``), each prompt
``eval.seeds_per_prompt`` times, prompt-major, ``eval.batch_size`` samples per batch; batch b samples with the
generator seeded ``eval.seed + b`` (as class-conditional batches do), so the FP reference and every quantized run
see the same prompts with the same noise. A shard stores each sample's prompt index as its label.

Prompts are encoded once per sweep (``varq.text.cache``: by content hash); the model's scale schedule follows
``eval.resolution`` and ``eval.aspect_ratio``; sampling is the bitwise sampler (``varq.sample.bitwise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from varq.config import EvalConfig, RunConfig
from varq.sample.batches import batch_generator, images_u8, sampling_dtype
from varq.sample.layout import BatchPlan

__all__ = ["T2ITask", "text_condition"]


def text_condition(cfg: RunConfig, prompts: list[str], device: torch.device):
    """The model's text condition (``TextCond``) of ``prompts``, from the feature cache under ``paths.cache``."""
    from varq.models.infinity import TextCond
    from varq.text.cache import TextFeatureCache
    from varq.text.encoder import TextEncoderSpec

    cache = TextFeatureCache.for_spec(cfg.paths.cache, TextEncoderSpec.from_model_config(cfg.model), device)
    feats = cache.features(prompts)
    return TextCond(feats.features_BLC.to(device), feats.lengths_B.to(device))


def schedule_of(ev: EvalConfig):
    """The scale schedule of the protocol's resolution and aspect ratio."""
    from varq.models.infinity_scales import schedule_for

    return schedule_for(float(ev.aspect_ratio), ev.resolution)


@dataclass(frozen=True)
class T2ITask:
    """Text-to-image sampling of the eval protocol's prompts; FID against a user-given statistics file only."""

    run: RunConfig
    prompts: tuple[str, ...]

    name = "t2i"

    @classmethod
    def of(cls, cfg: RunConfig) -> T2ITask:
        from varq.text.prompts import read_prompts

        ev = cfg.eval
        return cls(cfg, tuple(read_prompts(ev.prompts, ev.prompts_column, ev.num_prompts)))

    def plan(self, ev: EvalConfig) -> list[BatchPlan]:
        from varq.text.prompts import plan_from_eval

        return [BatchPlan(index=p.index, labels=p.prompt_indices, seed=ev.seed + p.index)
                for p in plan_from_eval(ev, len(self.prompts))]

    def generate_batch(self, model, vae, plan: BatchPlan, ev: EvalConfig, device: torch.device) -> np.ndarray:
        from varq.sample.bitwise import generate_bitwise

        model.set_schedule(schedule_of(ev))
        text = text_condition(self.run, [self.prompts[i] for i in plan.labels], device)
        sample = generate_bitwise(
            model, text, cfg=ev.cfg, tau=ev.tau, top_k=ev.top_k, top_p=ev.top_p, rng=batch_generator(plan, device),
            decode=vae.decode, autocast_dtype=sampling_dtype(ev.dtype),
        )
        return images_u8(sample.images_B3HW)

    def reference_stats(self, ev: EvalConfig, cache_dir: Path, device) -> dict[str, np.ndarray] | None:
        """FID statistics of real images for these prompts (``eval.reference_npz``: mu, sigma), None without."""
        if ev.reference_npz is None:
            return None
        with np.load(Path(ev.reference_npz).expanduser(), allow_pickle=False) as data:
            return {"mu": data["mu"], "sigma": data["sigma"]}
