"""``calib=random``: FP generations of randomly drawn classes, with the eval's guidance and top-k/top-p."""

from __future__ import annotations

from functools import partial

import torch

from varq.calib.calib_set import CalibSet
from varq.config import RunConfig
from varq.models.lookup import adapter_for
from varq.sample.batches import sampling_dtype
from varq.sample.sampler import LogitsHook, generate


def _record(store: list[torch.Tensor], si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
    store.append(idx_Bl.clone())  # observe only: the sampled tokens continue unchanged
    return idx_Bl


def draw_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """n class ids from a CPU generator, so the labels do not depend on the sampling device."""
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fp_generations(
    cfg: RunConfig, var, vqvae, device: torch.device, labels_N: torch.Tensor, on_logits: LogitsHook | None = None,
) -> CalibSet:
    """Sample ``labels_N`` with the FP model in batches of ``cfg.calib.batch_size`` and record every scale's tokens.

    Batch b uses a generator seeded ``cfg.calib.seed + 1 + b`` (the label draw uses ``cfg.calib.seed``).
    ``on_logits`` is passed through (resampling builders record the filtered probabilities with it).
    """
    ev, cal = cfg.eval, cfg.calib
    if cal.batch_size < 1 or len(labels_N) < 1:
        raise ValueError("calib.n_images and calib.batch_size must be >= 1")
    idx_chunks: list[list[torch.Tensor]] = []
    seeds = []
    for b, start in enumerate(range(0, len(labels_N), cal.batch_size)):
        label_B = labels_N[start : start + cal.batch_size]
        seed = cal.seed + 1 + b
        recorded: list[torch.Tensor] = []
        generate(
            var, vqvae, label_B.to(device), cfg=ev.cfg, top_k=ev.top_k, top_p=ev.top_p,
            rng=torch.Generator(device=device).manual_seed(seed), autocast_dtype=sampling_dtype(ev.dtype),
            on_logits=on_logits, override_idx=partial(_record, recorded),
        )
        idx_chunks.append(recorded)
        seeds.append(torch.full((len(label_B),), seed, dtype=torch.long))
    idx_per_scale = [torch.cat([chunk[si] for chunk in idx_chunks]) for si in range(adapter_for(var).num_scales)]
    teacher_input_NLC = vqvae.idxBl_to_var_input([idx.to(device) for idx in idx_per_scale]).float()
    return CalibSet(
        labels_N=labels_N.cpu(), seeds_N=torch.cat(seeds), idx_per_scale=[idx.cpu() for idx in idx_per_scale],
        teacher_input_NLC=teacher_input_NLC.cpu(), num_classes=var.num_classes, cfg=float(ev.cfg),
    )


def build(cfg: RunConfig, var, vqvae, device: torch.device) -> CalibSet:
    labels_N = draw_labels(cfg.calib.n_images, var.num_classes, cfg.calib.seed)
    return fp_generations(cfg, var, vqvae, device, labels_N)
