"""Text-to-image generation as a task (``varq.sample.batches.GenerationTask``): prompts in, images out.

The plan is the eval protocol's prompt file (``eval.prompts``, the first ``eval.num_prompts``), each prompt
``eval.seeds_per_prompt`` times, prompt-major, ``eval.batch_size`` samples per batch; batch b samples with the
generator seeded ``eval.seed + b`` (as class-conditional batches do), so the FP reference and every quantized run
see the same prompts with the same noise. A shard stores each sample's prompt index as its label.

Prompts are encoded once per sweep (``varq.text.cache``: by content hash); the model's scale schedule follows
``eval.resolution`` and ``eval.aspect_ratio`` (set when the model is built); sampling is the bitwise sampler
(``varq.sample.bitwise``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from varq.config import EvalConfig, RunConfig
from varq.sample.batches import batch_generator, images_u8, sampling_dtype
from varq.sample.layout import BatchPlan

__all__ = ["T2ITask", "check_schedule", "feature_cache", "schedule_of", "text_condition"]


def feature_cache(cfg: RunConfig, device: torch.device):
    """The run's prompt-feature cache under ``paths.cache``. It loads the text encoder on the first prompt it has not
    stored, once: keep one per task or calibration build rather than one per batch."""
    from varq.text.cache import TextFeatureCache
    from varq.text.encoder import TextEncoderSpec

    spec = TextEncoderSpec.from_model_config(cfg.model)
    return TextFeatureCache.for_spec(cfg.paths.cache, spec, device, cache_dir=cfg.paths.cache)


def text_condition(cache, prompts: list[str], device: torch.device):
    """The model's text condition (``TextCond``) of ``prompts``, from ``cache`` (`feature_cache`)."""
    from varq.models.infinity import TextCond

    feats = cache.features(prompts)
    return TextCond(feats.features_BLC.to(device), feats.lengths_B.to(device))


def schedule_of(ev: EvalConfig):
    """The scale schedule of the protocol's resolution and aspect ratio."""
    from varq.models.infinity_scales import schedule_for

    return schedule_for(float(ev.aspect_ratio), ev.resolution)


def check_schedule(model, ev: EvalConfig) -> None:
    """The model must already run the protocol's schedule: it is fixed when the model is built
    (``pipeline.build_model``), before quantizers capture the scale structure, never per batch."""
    if model.schedule != schedule_of(ev):
        raise ValueError(f"the model runs the scale schedule {model.schedule.hw}, not the one of eval.resolution="
                         f"{ev.resolution} eval.aspect_ratio={ev.aspect_ratio}; build it with pipeline.build_model")


@dataclass(frozen=True)
class T2ITask:
    """Text-to-image sampling of the eval protocol's prompts; FID against a user-given statistics file only."""

    run: RunConfig
    prompts: tuple[str, ...]
    _caches: dict = field(default_factory=dict, compare=False, repr=False)  # one feature cache per device

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

        check_schedule(model, ev)
        cache = self._caches.setdefault(str(device), feature_cache(self.run, device))
        text = text_condition(cache, [self.prompts[i] for i in plan.labels], device)
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
