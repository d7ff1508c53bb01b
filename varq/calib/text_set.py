"""Calibration for text-to-image models: FP generations of calibration prompts, and the set methods receive.

A `TextCalibSet` plays the part `CalibSet` plays for class-conditional VAR: N FP generations with the text condition
of each (cached T5 features), the sampled bits of every scale and the teacher-forcing input built from them, so a
method replays the model exactly as sampling ran it. ``teacher_batch`` returns the condition as a ``TextCond``
(with the model's learned unconditional features appended for CFG pairs) where ``CalibSet`` returns labels.

Which prompts (``calib.name``):
* ``random``: ``calib.n_images`` prompts drawn with replacement (seeded by ``calib.seed``) from the calibration pool;
* ``distinct``: the pool in a seeded order without repeats, cycling through it again when ``n_images`` exceeds it.
The pool is the eval prompt file minus the prompts the protocol evaluates (``eval.num_prompts`` first ones), so
calibration never sees an evaluation prompt; a file without spare prompts is refused. Batch b of the generations is
sampled with the generator seeded ``calib.seed + 1 + b`` under the protocol's cfg, tau and top-p.

``resample`` (Shift-and-Sum's calibration) cannot redraw tokens towards the model's codebook distribution: the
codebook has 2^32 implicit codes. Its bitwise analogue here is **per-bit frequency alignment**: the ``distinct``
generations, then at every scale and bit position the fraction of ones is moved to the model's mean predicted
probability of a one (after guidance, temperature and the per-bit top-p cut) by flipping the fewest bits, chosen
uniformly at random (seeded by ``calib.seed``). ``calib=dgc`` has no text-to-image form and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from varq.config import RunConfig, stable_hash

__all__ = ["TextCalibSet", "TEXT_BUILDERS", "ProbabilitySums", "align_bit_frequencies", "build",
           "calibration_prompts", "text_cache_key"]

FORMAT_VERSION = 1
KIND = "text"
TEXT_BUILDERS = ("random", "distinct", "resample")


@dataclass
class TextCalibSet:
    """N calibration generations (CPU tensors) of a text-to-image model."""

    prompts: list[str]
    features_NLtC: torch.Tensor  # T5 features of each prompt's real tokens, zero-padded
    lens_N: torch.Tensor
    uncond_NLtC: torch.Tensor  # the model's unconditional features of the same lengths (CFG's second half)
    seeds_N: torch.Tensor
    bits_per_scale: list[torch.Tensor]  # (N, h·w, d) int64 per scale
    teacher_input_NLC: torch.Tensor
    cfg: float
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = len(self.prompts)
        sizes = [self.features_NLtC.shape[0], self.lens_N.shape[0], self.uncond_NLtC.shape[0], self.seeds_N.shape[0],
                 self.teacher_input_NLC.shape[0], *[b.shape[0] for b in self.bits_per_scale]]
        if any(n != N for n in sizes):
            raise ValueError(f"TextCalibSet tensors disagree on the number of generations ({N}): {sizes}")

    def __len__(self) -> int:
        return len(self.prompts)

    def text(self, rows, uncond: bool = False):
        from varq.models.infinity import TextCond

        feats = self.uncond_NLtC if uncond else self.features_NLtC
        return TextCond(feats[rows], self.lens_N[rows])

    def teacher_batch(self, rows: Sequence[int] | torch.Tensor | slice, device: torch.device | str = "cpu",
                      with_uncond: bool = False):
        """(TextCond, x_BLCv) of ``rows``; ``with_uncond`` appends the unconditional copies ([cond; uncond])."""
        from varq.models.infinity import TextCond

        text, x_BLC = self.text(rows), self.teacher_input_NLC[rows]
        if with_uncond:
            text = TextCond.cat([text, self.text(rows, uncond=True)])
            x_BLC = torch.cat((x_BLC, x_BLC))
        return text.to(device), x_BLC.to(device)

    @torch.no_grad()
    def free_run(self, qmodel, rows: Sequence[int], sampler, seed: int) -> None:
        """Generate ``rows``' prompts with ``qmodel`` (Shift-and-Sum's free-running θ search)."""
        from varq.sample.bitwise import generate_bitwise

        device = next(qmodel.parameters()).device
        generate_bitwise(qmodel, self.text(list(rows)).to(device), cfg=sampler.cfg, tau=sampler.tau,
                         top_k=sampler.top_k, top_p=sampler.top_p,
                         rng=torch.Generator(device=device).manual_seed(seed))

    # ---------------------------------------------------------------- (de)serialisation
    def state(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": KIND, **{k: v for k, v in asdict(self).items()}}

    @classmethod
    def from_state(cls, state: dict) -> TextCalibSet:
        if state.get("format") != FORMAT_VERSION or state.get("kind") != KIND:
            raise ValueError(f"text calibration set format {state.get('format')}/{state.get('kind')}")
        fields = {k: v for k, v in state.items() if k not in ("format", "kind")}
        fields["bits_per_scale"] = list(fields["bits_per_scale"])
        return cls(**fields)


def calibration_prompts(cfg: RunConfig) -> list[str]:
    """The pool: the eval prompt file without the prompts the protocol evaluates."""
    from varq.text.prompts import read_prompts

    ev = cfg.eval
    every = read_prompts(ev.prompts, ev.prompts_column, None)
    pool = every[ev.num_prompts:] if ev.num_prompts is not None else []
    if not pool:
        raise ValueError(f"calibration of a text-to-image model needs prompts the protocol does not evaluate: "
                         f"eval.prompts={ev.prompts!r} has {len(every)} and eval.num_prompts={ev.num_prompts} uses "
                         f"them all; lower eval.num_prompts or use a longer prompt file")
    return pool


def draw_prompts(pool: list[str], n: int, name: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    if name == "random":
        return [pool[i] for i in rng.integers(0, len(pool), size=n)]
    # distinct, and resample (which aligns distinct generations)
    order = rng.permutation(len(pool))
    return [pool[order[i % len(pool)]] for i in range(n)]


class ProbabilitySums:
    """The sampler's ``on_logits`` hook: per scale, the sum over rows and tokens of each bit's probability of a one
    as sampling draws it (guidance on the temperature-scaled logits, then the per-bit top-p cut)."""

    def __init__(self, cfg: float, top_p: float) -> None:
        self.cfg, self.top_p = float(cfg), float(top_p)
        self.sums_d: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, si: int, logits_2BlV: torch.Tensor) -> None:
        B = logits_2BlV.shape[0] // 2
        mixed_BlV = self.cfg * logits_2BlV[:B].float() + (1 - self.cfg) * logits_2BlV[B:].float()
        p1_Bld = mixed_BlV.view(B, mixed_BlV.shape[1], -1, 2).softmax(dim=-1)[..., 1]
        if 0 < self.top_p < 1:  # a value with probability ≤ 1 − top_p is never drawn
            cut = 1 - self.top_p
            p1_Bld = torch.where(p1_Bld <= cut, 0.0, torch.where(p1_Bld >= 1 - cut, 1.0, p1_Bld))
        total = p1_Bld.sum(dim=(0, 1)).cpu().double()
        self.sums_d[si] = total if si not in self.sums_d else self.sums_d[si] + total
        self.counts[si] = self.counts.get(si, 0) + p1_Bld.shape[0] * p1_Bld.shape[1]

    def mean_per_scale(self) -> list[torch.Tensor]:
        return [self.sums_d[si] / self.counts[si] for si in sorted(self.sums_d)]


def align_bit_frequencies(bits_per_scale: list[torch.Tensor], target_per_scale: list[torch.Tensor],
                          seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """Per scale and bit position, flip the fewest bits so the fraction of ones is round(target · tokens) / tokens;
    the flipped positions are drawn uniformly among those holding the surplus value. Returns the new bits and the
    number of flips per scale."""
    gen = torch.Generator().manual_seed(seed)
    out, flipped = [], []
    for bits_Nld, target_d in zip(bits_per_scale, target_per_scale):
        N, l, d = bits_Nld.shape
        flat_Td = bits_Nld.reshape(N * l, d).clone()
        want_d = torch.round(target_d * (N * l)).long()
        count = 0
        for j in range(d):
            have = int(flat_Td[:, j].sum())
            surplus = have - int(want_d[j])
            if surplus == 0:
                continue
            value = 1 if surplus > 0 else 0  # too many ones: turn ones into zeros, and vice versa
            where = torch.nonzero(flat_Td[:, j] == value).flatten()
            pick = where[torch.randperm(where.numel(), generator=gen)[: abs(surplus)]]
            flat_Td[pick, j] = 1 - value
            count += abs(surplus)
        out.append(flat_Td.view(N, l, d))
        flipped.append(count)
    return out, flipped


def text_cache_key(cfg: RunConfig, device: torch.device) -> str:
    from varq.identity import model_identity

    ev = cfg.eval
    return stable_hash({
        "format": FORMAT_VERSION, "kind": KIND, "model": model_identity(cfg), "calib": asdict(cfg.calib),
        "prompts": calibration_prompts(cfg),
        "sampling": {"cfg": ev.cfg, "tau": ev.tau, "top_k": ev.top_k, "top_p": ev.top_p, "dtype": ev.dtype,
                     "resolution": ev.resolution, "aspect_ratio": ev.aspect_ratio},
        "device": torch.device(device).type,
    }, length=16)


@torch.no_grad()
def build(cfg: RunConfig, model, vae, device: torch.device) -> TextCalibSet:
    from varq.models.infinity import TextCond
    from varq.sample.batches import sampling_dtype
    from varq.sample.bitwise import generate_bitwise, teacher_inputs
    from varq.sample.t2i import check_schedule, feature_cache, text_condition

    cal, ev = cfg.calib, cfg.eval
    if cal.name not in TEXT_BUILDERS:
        raise ValueError(f"calib={cal.name} has no text-to-image form; use calib=random or calib=distinct")
    prompts = draw_prompts(calibration_prompts(cfg), cal.n_images, cal.name, cal.seed)
    check_schedule(model, ev)
    cache = feature_cache(cfg, device)
    texts, uncond, bits, seeds = [], [], [], []
    prob_sums = ProbabilitySums(ev.cfg, ev.top_p)
    for b, start in enumerate(range(0, len(prompts), cal.batch_size)):
        text = text_condition(cache, prompts[start : start + cal.batch_size], device)
        seed = cal.seed + 1 + b
        sample = generate_bitwise(model, text, cfg=ev.cfg, tau=ev.tau, top_k=ev.top_k, top_p=ev.top_p,
                                  rng=torch.Generator(device=device).manual_seed(seed),
                                  autocast_dtype=sampling_dtype(ev.dtype), on_logits=prob_sums)
        texts.append(text.to("cpu"))
        uncond.append(model.uncond(text).to("cpu"))
        bits.append([x.cpu() for x in sample.bits_Bld])
        seeds.append(torch.full((text.batch_size,), seed, dtype=torch.long))
    text_N, uncond_N = TextCond.cat(texts), TextCond.cat(uncond)
    bits_per_scale = [torch.cat([chunk[si] for chunk in bits]) for si in range(len(bits[0]))]
    meta: dict = {"builder": cal.name}
    if cal.name == "resample":
        bits_per_scale, flipped = align_bit_frequencies(bits_per_scale, prob_sums.mean_per_scale(), cal.seed)
        meta["flipped_per_scale"] = flipped
    x_NLC = teacher_inputs(model, [b.to(device) for b in bits_per_scale]).float().cpu()
    return TextCalibSet(
        prompts=prompts, features_NLtC=text_N.features_BLtC.float(), lens_N=text_N.lens_B,
        uncond_NLtC=uncond_N.features_BLtC.float(), seeds_N=torch.cat(seeds), bits_per_scale=bits_per_scale,
        teacher_input_NLC=x_NLC, cfg=float(ev.cfg), meta=meta,
    )
