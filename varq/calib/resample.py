"""``calib=resample``: Shift-and-Sum's calibration set (methods.md §3.5).

1. ``calib.n_images`` *distinct* classes (256 for ImageNet; capped at the model's class count, so var_digits uses all
   10), drawn without replacement as the release draws them (numpy's ``choice`` seeded ``calib.seed``;
   ``calib.class_draw=torch`` keeps torch's ``randperm``); one FP generation each, with the eval's
   guidance and top-k/top-p. At every scale the sampler's *filtered* probabilities (softmax after top-k/top-p of the
   mixed logits) are kept next to the sampled tokens.
2. Per scale (N = sequences × pn² slots): target_c = floor(N·p̄_c) plus largest-remainder rounding, p̄ the mean filtered
   probability. Over-represented codes (ascending) hand their excess slots — those with the most probability mass on
   the still-short codes U — to a redraw from p restricted to U (uniform on U if that mass is 0), with a per-sequence
   generator seeded ``calib.seed + 10000 + label``. Afterwards every scale's histogram equals its target exactly.
3. The resampled tokens become the teacher-forcing input (``vqvae.idxBl_to_var_input``, the same inputs the sampler
   builds with ``override_idx``); methods replay them (`varq.quant.replay`) to collect calibration inputs.

The probabilities are stored sparsely (CSR per scale: only the entries that survive top-k/top-p), so ImageNet's
256 × 680 slots × 4096 codes do not have to sit in memory densely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from varq.calib.calib_set import CalibSet
from varq.calib.random import fp_generations
from varq.config import RunConfig
from varq.models.lookup import adapter_for
from varq.sample.filtering import filter_top_k_top_p_
from varq.sample.sampler import cfg_mix

__all__ = [
    "SparseProbs", "FilteredProbsRecorder", "draw_distinct_labels", "target_histogram", "resample_scale",
    "resample_tokens", "build",
]

REDRAW_SEED_OFFSET = 10_000  # released code: per-sample generator seed + 10000 + label


@dataclass
class SparseProbs:
    """Filtered probabilities of N slots (row-major over sequences × tokens) in CSR form, plus their column sums."""

    ptr_N1: np.ndarray  # (N + 1,) int64 offsets
    cols: np.ndarray  # (nnz,) int64 codes
    vals: np.ndarray  # (nnz,) float64 probabilities
    sum_V: np.ndarray  # (V,) float64: Σ over slots of p (for the mean)

    @classmethod
    def from_dense(cls, p_NV: torch.Tensor) -> SparseProbs:
        p = p_NV.detach().double().cpu()
        rows, cols = p.nonzero(as_tuple=True)
        ptr = np.zeros(p.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows.numpy(), minlength=p.shape[0]), out=ptr[1:])
        return cls(ptr, cols.numpy().astype(np.int64), p[rows, cols].numpy(), p.sum(0).numpy())

    @classmethod
    def concat(cls, parts: list[SparseProbs]) -> SparseProbs:
        offsets = np.cumsum([0] + [len(p.cols) for p in parts[:-1]])
        ptr = np.concatenate([parts[0].ptr_N1[:1]] + [p.ptr_N1[1:] + o for p, o in zip(parts, offsets)])
        return cls(ptr, np.concatenate([p.cols for p in parts]), np.concatenate([p.vals for p in parts]),
                   np.sum([p.sum_V for p in parts], axis=0))

    @property
    def num_slots(self) -> int:
        return len(self.ptr_N1) - 1


@dataclass
class FilteredProbsRecorder:
    """``on_logits`` hook: the sampler's filtered probabilities per scale (same mixing and filtering as sampling)."""

    cfg: float
    top_k: int
    top_p: float
    num_scales: int
    parts: list[list[SparseProbs]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parts = [[] for _ in range(self.num_scales)]

    def __call__(self, si: int, logits_2BlV: torch.Tensor) -> None:
        logits_BlV = cfg_mix(logits_2BlV.float(), self.cfg, si, self.num_scales).clone()
        p_BlV = filter_top_k_top_p_(logits_BlV, self.top_k, self.top_p).softmax(dim=-1)
        self.parts[si].append(SparseProbs.from_dense(p_BlV.flatten(0, 1)))

    def scale(self, si: int) -> SparseProbs:
        return SparseProbs.concat(self.parts[si])


CLASS_DRAWS = ("numpy", "torch")


def draw_distinct_labels(n: int, num_classes: int, seed: int, draw: str = "numpy") -> torch.Tensor:
    """min(n, num_classes) distinct classes, without replacement, from a CPU generator (device independent).

    ``draw="numpy"`` is the released draw, ``np.random.seed(seed); np.random.choice(num_classes, n, replace=False)``
    (a RandomState of its own here, so no global state changes); ``"torch"`` takes the first n of
    ``torch.randperm(num_classes)`` under ``manual_seed(seed)`` (a different set: 73 of 256 ImageNet classes agree).
    """
    if n < 1:
        raise ValueError("calib.n_images (the number of distinct classes) must be >= 1")
    k = min(n, num_classes)
    if draw == "numpy":
        return torch.from_numpy(np.random.RandomState(seed).choice(num_classes, k, replace=False)).long()
    if draw == "torch":
        return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:k]
    raise ValueError(f"calib.class_draw={draw!r}; choose one of {', '.join(CLASS_DRAWS)}")


def target_histogram(mean_p_V: np.ndarray, num_slots: int) -> np.ndarray:
    """floor(N·p̄) with the N − Σ floor leftover counts given to the largest fractional parts (ties: lower code)."""
    expected_V = num_slots * np.asarray(mean_p_V, dtype=np.float64)
    target_V = np.floor(expected_V).astype(np.int64)
    leftover = num_slots - int(target_V.sum())
    if leftover < 0 or leftover > len(target_V):
        raise ValueError(f"mean probabilities do not sum to 1 (leftover {leftover} of {num_slots} slots)")
    frac_V = expected_V - target_V
    target_V[np.argsort(-frac_V, kind="stable")[:leftover]] += 1
    return target_V


def _mass_on(probs: SparseProbs, slots: np.ndarray, in_U: np.ndarray) -> np.ndarray:
    # Σ_{u∈U} p_s(u) for each slot s, gathering only those slots' CSR segments
    starts, ends = probs.ptr_N1[slots], probs.ptr_N1[slots + 1]
    lens = ends - starts
    seg_start = np.concatenate(([0], np.cumsum(lens)[:-1]))
    flat = np.repeat(starts - seg_start, lens) + np.arange(int(lens.sum()))
    masked = probs.vals[flat] * in_U[probs.cols[flat]]
    return np.add.reduceat(masked, seg_start) if len(masked) else np.zeros(len(slots))


def resample_scale(
    idx_N: np.ndarray, probs: SparseProbs, row_of_slot_N: np.ndarray, rngs: list[np.random.Generator],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Resample one scale's tokens so their histogram equals the target; returns (new idx, target, slots redrawn).

    ``idx_N``: sampled code of every slot; ``probs``: the slots' filtered probabilities (every sampled code has
    p > 0, so no segment is empty); ``row_of_slot_N``: which sequence each slot belongs to (selects its generator).
    """
    V = len(probs.sum_V)
    idx_N = np.array(idx_N, dtype=np.int64, copy=True)
    target_V = target_histogram(probs.sum_V / probs.num_slots, probs.num_slots)
    current_V = np.bincount(idx_N, minlength=V)
    excess_V = np.maximum(current_V - target_V, 0)
    shortage_V = np.maximum(target_V - current_V, 0)
    in_U = shortage_V > 0
    redrawn = 0
    for c in np.flatnonzero(excess_V):  # ascending code index, as in the released code
        slots = np.flatnonzero(idx_N == c)
        mass = _mass_on(probs, slots, in_U)
        for s in slots[np.argsort(-mass, kind="stable")[: excess_V[c]]]:
            seg = slice(probs.ptr_N1[s], probs.ptr_N1[s + 1])
            cols, vals = probs.cols[seg], probs.vals[seg]
            keep = in_U[cols]
            rng = rngs[row_of_slot_N[s]]
            if vals[keep].sum() > 0:
                cum = np.cumsum(vals[keep])
                pick = cols[keep][min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)]
            else:  # no mass on the short codes: uniform over them
                short = np.flatnonzero(in_U)
                pick = short[rng.integers(len(short))]
            idx_N[s] = pick
            shortage_V[pick] -= 1
            in_U[pick] = shortage_V[pick] > 0
            redrawn += 1
    return idx_N, target_V, redrawn


def resample_tokens(
    idx_per_scale: list[torch.Tensor], recorder: FilteredProbsRecorder, labels_N: torch.Tensor, seed: int,
) -> tuple[list[torch.Tensor], list[np.ndarray], dict]:
    """Resample every scale (in order, sharing each sequence's generator across scales)."""
    rngs = [np.random.default_rng(seed + REDRAW_SEED_OFFSET + int(label)) for label in labels_N.tolist()]
    out, targets, redrawn, tv_before = [], [], [], []
    for si, idx_Nl in enumerate(idx_per_scale):
        N, l = idx_Nl.shape
        probs = recorder.scale(si)
        if probs.num_slots != N * l:
            raise ValueError(f"scale {si}: {probs.num_slots} recorded probability rows for {N * l} sampled tokens")
        flat = idx_Nl.reshape(-1).numpy()
        new, target_V, count = resample_scale(flat, probs, np.repeat(np.arange(N), l), rngs)
        before_V = np.bincount(flat, minlength=len(target_V))
        tv_before.append(float(np.abs(before_V - target_V).sum() / (2 * N * l)))
        redrawn.append(count)
        targets.append(target_V)
        out.append(torch.from_numpy(new).view(N, l).to(idx_Nl.dtype))
    return out, targets, {"redrawn_per_scale": redrawn, "tv_before_per_scale": tv_before}


def build(cfg: RunConfig, var, vqvae, device: torch.device) -> CalibSet:
    labels_N = draw_distinct_labels(cfg.calib.n_images, var.num_classes, cfg.calib.seed, cfg.calib.class_draw)
    ev = cfg.eval
    recorder = FilteredProbsRecorder(ev.cfg, ev.top_k, ev.top_p, adapter_for(var).num_scales)
    sampled = fp_generations(cfg, var, vqvae, device, labels_N, on_logits=recorder)
    idx_per_scale, _, stats = resample_tokens(sampled.idx_per_scale, recorder, sampled.labels_N, cfg.calib.seed)
    teacher_input_NLC = vqvae.idxBl_to_var_input([idx.to(device) for idx in idx_per_scale]).float()
    return CalibSet(
        labels_N=sampled.labels_N, seeds_N=sampled.seeds_N, idx_per_scale=idx_per_scale,
        teacher_input_NLC=teacher_input_NLC.cpu(), num_classes=sampled.num_classes, cfg=sampled.cfg,
        meta={"distinct_classes": len(labels_N), **stats},
    )
