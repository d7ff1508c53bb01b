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
   group covariance (C > N makes it rank-deficient). Pool, take the top n_keep; the cond share of those is the ratio
   (0.5 when the two groups' distances all agree within ``atol``).
4. Selection. Intent (``selection: distance``, default): keep those top-n_keep sequences themselves — the samples that
   spread the distribution most. Released (``selection: ratio``): only the ratio is used; from every generation batch
   keep its first round(ratio·B) cond rows and first B − round(ratio·B) uncond rows.

Options are read from the calib config when present (``selection``, ``feature``, ``top_p``, ``n_keep``, ``atol``),
with the defaults of `DGCOptions` otherwise. The released code samples with top-p 0.95 (the evaluation uses 0.96);
``top_p: null`` uses the evaluation's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from varq.calib.calib_set import CalibSet
from varq.calib.random import draw_labels, fp_generations
from varq.quant.calib_pass import CalibBatch, teacher_forward

__all__ = ["DGCOptions", "mahalanobis_distances", "cond_ratio", "select_rows", "sink_features", "build"]

SELECTIONS = ("distance", "ratio")
FEATURES = ("sink", "mean")


@dataclass(frozen=True)
class DGCOptions:
    selection: str = "distance"  # distance (paper's intent) | ratio (released code)
    feature: str = "sink"  # sink: last block, token 0, unmasked pass (released) | mean: masked pass, token mean
    top_p: float | None = None  # None: the eval's top-p; the released code used 0.95
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
    """Share of conditional rows among the n_keep largest pooled distances (0.5 if both groups agree within atol)."""
    if dist_cond_N.shape == dist_uncond_N.shape and torch.allclose(dist_cond_N, dist_uncond_N, rtol=0, atol=atol):
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

    handle = var.blocks[-1].register_forward_hook(hook)
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


def _rows(calib_set: CalibSet, cond_rows: torch.Tensor, uncond_rows: torch.Tensor, meta: dict) -> CalibSet:
    rows = torch.cat((cond_rows, uncond_rows))
    null_labels = torch.full((len(uncond_rows),), calib_set.num_classes, dtype=calib_set.labels_N.dtype)
    return CalibSet(
        labels_N=torch.cat((calib_set.labels_N[cond_rows], null_labels)),
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
    gen_cfg = cfg
    if opts.top_p is not None:
        gen_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, top_p=opts.top_p))
    generations = fp_generations(gen_cfg, var, vqvae, device, draw_labels(n, var.num_classes, cfg.calib.seed))
    feat_cond_NC, feat_uncond_NC = sink_features(var, generations, cfg.calib.batch_size, device, opts.feature)
    dist_cond_N, dist_uncond_N = mahalanobis_distances(feat_cond_NC), mahalanobis_distances(feat_uncond_NC)
    cond_rows, uncond_rows, ratio = select_rows(dist_cond_N, dist_uncond_N, n_keep, opts, cfg.calib.batch_size)
    meta = {**dataclasses.asdict(opts), "cond_ratio": ratio, "n_cond": len(cond_rows), "n_uncond": len(uncond_rows)}
    return _rows(generations, cond_rows, uncond_rows, meta)
