"""``calib=dgc``: PTQ4ARVG's Distribution-Guided Calibration (methods.md §4.7).

1. FP generations of ``calib.n_images`` random classes; each gives a conditional and an unconditional sequence (the
   two CFG halves share the sampled tokens), so 2·n_images candidates.
2. A feature per candidate: the last block's output at the sink token. Under the block-causal mask the sink only
   sees itself, so its output is a function of the label alone (every unconditional row would be identical); the
   released code runs this pass unmasked, where the sink attends to the whole sequence — the only pass in which the
   feature describes a sample, so it is kept for the features (the *quantizer* statistics come from the masked pass,
   see `varq.quant.calib_pass`). ``feature: mean`` is the mask-consistent alternative: the mean over all tokens of
   the last block's output in the masked pass.
3. Mahalanobis distance of every feature to its own group's (cond / uncond) mean, with the pseudo-inverse of the
   group covariance (C > N makes it rank-deficient). Pool, take the top n_keep; the cond share of those is the ratio.
   When the two groups' distances agree within ``atol`` (``allclose``) the ratio is 0.5, with a warning: with
   C ≥ N every distance equals (N − 1)/√N in both groups (the centred features span an (N − 1)-dimensional space,
   every leverage is 1 − 1/N), so on the ImageNet VARs (C ≥ 1024, N = 128) the released DGC always falls back to 0.5.
4. Selection. Released (``selection: ratio``, default): only the ratio is used; from every generation batch keep its
   first round(ratio·B) cond rows and first B − round(ratio·B) uncond rows. ``selection: distance`` keeps the
   top-n_keep sequences themselves (the paper's wording: the samples that spread the distribution most); on ties
   (C ≥ N) that ranking is rounding noise.
5. Order: the kept rows are laid out as the released set, generation batch by generation batch, each batch's cond
   rows then its uncond rows; a calibration batch of 2 generation batches thus mixes cond and uncond rows, and the
   EMA over calibration batches weighs both halves alike (a cond-then-uncond layout would weigh them 0.9 / 0.1).

Options are read from the calib config (``selection``, ``feature``, ``top_p``, ``dtype``, ``n_keep``, ``atol``). The
released code generates 128 images in batches of 32 with seed 42, top-p 0.95 (the evaluation uses 0.96) and fp32
(varq/conf/calib/dgc.yaml); ``top_p: null`` / ``dtype: null`` use the evaluation's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from varq.calib.calib_set import CalibSet
from varq.calib.random import draw_labels, fp_generations
from varq.models.lookup import adapter_for
from varq.quant.calib_pass import CalibBatch, teacher_forward

__all__ = [
    "DGCOptions", "mahalanobis_distances", "cond_ratio", "select_rows", "released_order", "sink_features", "build",
]

log = logging.getLogger(__name__)

SELECTIONS = ("distance", "ratio")
FEATURES = ("sink", "mean")


@dataclass(frozen=True)
class DGCOptions:
    selection: str = "ratio"  # ratio (released code) | distance (the top-n_keep sequences themselves)
    feature: str = "sink"  # sink: last block, token 0, unmasked pass (released) | mean: masked pass, token mean
    top_p: float | None = 0.95  # None: the eval's top-p; the released code used 0.95
    dtype: str | None = "fp32"  # generation dtype; None: the eval's (the released code generates in fp32)
    n_keep: int | None = None  # sequences kept; None: calib.n_images (half of the candidates)
    atol: float = 1e-3  # distances this close in both groups → ratio 0.5

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"calib.dgc.selection={self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.feature not in FEATURES:
            raise ValueError(f"calib.dgc.feature={self.feature!r}; choose one of {', '.join(FEATURES)}")

    @classmethod
    def from_calib(cls, calib) -> DGCOptions:
        return cls(**dataclasses.asdict(calib.dgc))


def mahalanobis_distances(feat_NC: torch.Tensor) -> torch.Tensor:
    """Distance of every row to the rows' mean under the pseudo-inverse of their (unbiased) covariance, in float64."""
    f = feat_NC.double()
    centred_NC = f - f.mean(dim=0, keepdim=True)
    cov_CC = centred_NC.T @ centred_NC / max(f.shape[0] - 1, 1)
    prec_CC = torch.linalg.pinv(cov_CC, hermitian=True)
    return ((centred_NC @ prec_CC) * centred_NC).sum(dim=1).clamp_min(0).sqrt()


def cond_ratio(dist_cond_N: torch.Tensor, dist_uncond_N: torch.Tensor, n_keep: int, atol: float = 1e-3) -> float:
    """Share of conditional rows among the n_keep largest pooled distances; 0.5, with a warning, if both groups'
    distances agree (``allclose`` with torch's default rtol and ``atol``, as released)."""
    if dist_cond_N.shape == dist_uncond_N.shape and torch.allclose(dist_cond_N, dist_uncond_N, atol=atol):
        n = dist_cond_N.numel()
        log.warning(
            "DGC: the cond and uncond Mahalanobis distances all agree (%d rows per group; with feature dim >= rows "
            "every distance is (N-1)/sqrt(N) = %.4f), so they carry no information: cond/uncond ratio 0.5",
            n, (n - 1) / max(n, 1) ** 0.5,
        )
        return 0.5
    pooled = torch.cat((dist_cond_N, dist_uncond_N))
    top = torch.topk(pooled, n_keep).indices
    return float((top < dist_cond_N.numel()).sum()) / n_keep


def select_rows(
    dist_cond_N: torch.Tensor, dist_uncond_N: torch.Tensor, n_keep: int, opts: DGCOptions, batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(cond rows, uncond rows, ratio): indices into the n generations of the sequences to keep."""
    n = dist_cond_N.numel()
    ratio = cond_ratio(dist_cond_N, dist_uncond_N, n_keep, opts.atol)
    if opts.selection == "distance":
        top = torch.topk(torch.cat((dist_cond_N, dist_uncond_N)), n_keep).indices.sort().values
        return top[top < n], top[top >= n] - n, ratio
    cond, uncond = [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        n_cond = round(ratio * size)
        cond.extend(range(start, start + n_cond))
        uncond.extend(range(start, start + size - n_cond))
    return torch.tensor(cond, dtype=torch.long), torch.tensor(uncond, dtype=torch.long), ratio


@torch.no_grad()
def sink_features(
    var, calib_set: CalibSet, batch_size: int, device, feature: str = "sink"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond features, uncond features), each (N, C), from the last block's output (see the module docstring)."""
    captured: list[torch.Tensor] = []

    def hook(mod, args, out_BLC):
        captured.append((out_BLC[:, 0] if feature == "sink" else out_BLC.float().mean(dim=1)).float().cpu())

    handle = adapter_for(var).last_block().register_forward_hook(hook)
    cond, uncond = [], []
    try:
        for start in range(0, len(calib_set), batch_size):
            label_2B, x_2BLC = calib_set.teacher_batch(slice(start, start + batch_size), device, with_uncond=True)
            B = label_2B.shape[0] // 2
            teacher_forward(var, CalibBatch(label_2B, x_2BLC, B), masked=feature != "sink")
            f_2BC = captured.pop()
            cond.append(f_2BC[:B])
            uncond.append(f_2BC[B:])
    finally:
        handle.remove()
    return torch.cat(cond), torch.cat(uncond)


def released_order(
    cond_rows: torch.Tensor, uncond_rows: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generation row, is_uncond) of every kept sequence in the released layout: generation batch by generation
    batch, the batch's cond rows, then its uncond rows, each in generation order."""
    keys = [(int(r) // batch_size, 0, int(r)) for r in cond_rows] + [(int(r) // batch_size, 1, int(r)) for r in uncond_rows]
    keys.sort()
    return (torch.tensor([k[2] for k in keys], dtype=torch.long),
            torch.tensor([bool(k[1]) for k in keys], dtype=torch.bool))


def _rows(calib_set: CalibSet, rows: torch.Tensor, uncond: torch.Tensor, meta: dict) -> CalibSet:
    labels = torch.where(uncond, torch.full_like(calib_set.labels_N[rows], calib_set.num_classes),
                         calib_set.labels_N[rows])
    return CalibSet(
        labels_N=labels,
        seeds_N=calib_set.seeds_N[rows], idx_per_scale=[idx[rows] for idx in calib_set.idx_per_scale],
        teacher_input_NLC=calib_set.teacher_input_NLC[rows], num_classes=calib_set.num_classes,
        cfg=calib_set.cfg, meta=meta,
    )


def build(cfg, var, vqvae, device) -> CalibSet:
    opts = DGCOptions.from_calib(cfg.calib)
    n = cfg.calib.n_images
    n_keep = n if opts.n_keep is None else opts.n_keep
    if not 1 <= n_keep <= 2 * n:
        raise ValueError(f"calib.n_keep={n_keep} must be in [1, 2·calib.n_images = {2 * n}]")
    if opts.selection == "ratio" and n_keep != n:
        raise ValueError("calib.selection=ratio keeps calib.n_images sequences; leave calib.n_keep unset")
    gen_eval = cfg.eval
    if opts.top_p is not None:
        gen_eval = dataclasses.replace(gen_eval, top_p=opts.top_p)
    if opts.dtype is not None:
        gen_eval = dataclasses.replace(gen_eval, dtype=opts.dtype)
    gen_cfg = dataclasses.replace(cfg, eval=gen_eval)
    generations = fp_generations(gen_cfg, var, vqvae, device, draw_labels(n, var.num_classes, cfg.calib.seed))
    feat_cond_NC, feat_uncond_NC = sink_features(var, generations, cfg.calib.batch_size, device, opts.feature)
    dist_cond_N, dist_uncond_N = mahalanobis_distances(feat_cond_NC), mahalanobis_distances(feat_uncond_NC)
    cond_rows, uncond_rows, ratio = select_rows(dist_cond_N, dist_uncond_N, n_keep, opts, cfg.calib.batch_size)
    meta = {**dataclasses.asdict(opts), "cond_ratio": ratio, "n_cond": len(cond_rows), "n_uncond": len(uncond_rows)}
    rows, uncond = released_order(cond_rows, uncond_rows, cfg.calib.batch_size)
    return _rows(generations, rows, uncond, meta)
