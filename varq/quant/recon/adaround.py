"""AdaRound optimisation of one reconstruction unit (methods.md §3.6): learn α, anneal β, harden.

A unit is a callable from input rows to output rows plus the QuantLinears whose weight rounding it learns. Its loss is
the output error summed over channels, averaged over the rows and tokens of each VAR scale and summed over the scales
(Σ_scales mean_rows Σ_channels (ŷ − y)²), so the few tokens of the coarse scales weigh as much as a fine scale.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from varq.progress import Progress
from varq.quant.qmodules import QuantLinear
from varq.quant.quantizer import FakeQuantizer
from varq.quant.recon.config import ReconConfig
from varq.quant.rounding import AdaRoundRounding

__all__ = ["Unit", "UnitStats", "fit_unit", "unit_loss", "install_adaround"]

EVAL_CHUNK = 16  # rows per forward when scoring a unit on the whole calibration set
PROGRESS_EVERY = 50  # iterations between progress updates inside one unit
NAN_CHECK_EVERY = 100  # iterations between finiteness checks (each one synchronises a GPU)


@dataclass
class Unit:
    name: str
    linears: dict[str, QuantLinear]  # FQN → QuantLinear whose weight rounding is learned
    forward: Callable[[torch.Tensor], torch.Tensor]  # the quantized unit (input rows → output rows)
    scale_idx_L: torch.Tensor | None  # VAR scale of each output token; None: one vector per row


@dataclass
class UnitStats:
    name: str
    loss_rtn: float  # round-to-nearest weights, on all calibration rows
    loss_after: float  # hardened AdaRound weights, same rows
    loss_soft_end: float  # last training batch, soft rounding
    reg_end: float  # mean of 1 − |2h(α) − 1|^b_end at the end: 0 once every rounding is decided
    num_weights: int
    iters: int
    fit_s: float  # optimisation only
    s_per_iter: float
    score_s: float  # the two loss evaluations on all rows (RTN before, hardened after): reporting, not fitting

    def as_dict(self) -> dict:
        return asdict(self)


def unit_loss(out: torch.Tensor, target: torch.Tensor, weight_L: torch.Tensor | None) -> torch.Tensor:
    """Σ_scales mean over (rows, tokens of the scale) of Σ_channels (out − target)²; ``weight_L`` = 1/|scale of l|."""
    err = (out.float() - target.float()).pow(2).sum(-1)  # (B, L) or (B,)
    if weight_L is None:
        return err.mean()
    return (err.mean(0) * weight_L).sum()


def loss_weights(scale_idx_L: torch.Tensor | None) -> torch.Tensor | None:
    if scale_idx_L is None:
        return None
    counts = torch.bincount(scale_idx_L)
    return 1.0 / counts[scale_idx_L].float()


def _check_weight_quantizer(fqn: str, q: FakeQuantizer) -> None:
    if not isinstance(q, FakeQuantizer) or q.spec.kind != "uniform" or q.spec.dynamic or not q.is_frozen:
        raise ValueError(
            f"{fqn}: AdaRound needs a static, frozen, uniform weight quantizer (got {q!r}); build it with "
            f"varq.quant.factories.static_weight_quantizer"
        )


@torch.no_grad()
def install_adaround(linear: QuantLinear) -> AdaRoundRounding:
    """Switch the weight rounding to AdaRound with h(α) = frac(w/Δ), i.e. starting from the FP weight."""
    q = linear.weight_quantizer
    rounding = q.rounding if isinstance(q.rounding, AdaRoundRounding) else AdaRoundRounding()
    q.rounding = rounding.to(linear.weight.device)
    rounding.alpha = nn.Parameter(torch.empty(0, device=linear.weight.device))  # re-initialise from the weight
    q.invalidate_cache()
    enabled, q.enabled = q.enabled, True  # the first quantizer call initialises α, so it must really run
    try:
        q(linear.weight)
    finally:
        q.enabled = enabled
    return rounding


@torch.no_grad()
def score(unit: Unit, x_N: torch.Tensor, y_N: torch.Tensor, weight_L: torch.Tensor | None) -> float:
    """Unit loss over every row (row-weighted mean of per-chunk losses: the loss is linear in the rows)."""
    total, N = 0.0, x_N.shape[0]
    for i in range(0, N, EVAL_CHUNK):
        x, y = x_N[i : i + EVAL_CHUNK], y_N[i : i + EVAL_CHUNK]
        total += unit_loss(unit.forward(x), y, weight_L).item() * x.shape[0]
    value = total / N
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"reconstruction unit {unit.name}: non-finite output error {value}")
    return value


def _regularizer(roundings: list[AdaRoundRounding], beta: float) -> torch.Tensor:
    return torch.stack([r.regularizer(beta) for r in roundings]).sum()


@contextlib.contextmanager
def gemm_precision(precision: str, device: torch.device) -> Iterator[None]:
    """The unit forward's GEMM precision on CUDA: TF32 matmuls or bf16 autocast; fp32 (and any CPU) unchanged.

    The quantizers compute in fp32 whatever the autocast (`varq.quant.primitives`), and α is an fp32 Parameter, so
    only the matmuls lose precision; TF32 is switched on for the block and restored after it.
    """
    if device.type != "cuda" or precision == "fp32":
        yield
    elif precision == "bf16":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fit_unit(
    unit: Unit, x_N: torch.Tensor, y_N: torch.Tensor, cfg: ReconConfig, gen: torch.Generator,
) -> UnitStats:
    """Learn the rounding of ``unit`` on inputs ``x_N`` and FP targets ``y_N`` (all rows), then harden it."""
    for fqn, linear in unit.linears.items():
        _check_weight_quantizer(fqn, linear.weight_quantizer)
    weight_L = loss_weights(unit.scale_idx_L)
    if weight_L is not None:
        weight_L = weight_L.to(x_N.device)
    t_score = time.perf_counter()
    loss_rtn = score(unit, x_N, y_N, weight_L)  # .item() inside: the time is the GPU's too
    score_s = time.perf_counter() - t_score

    roundings = [install_adaround(linear) for linear in unit.linears.values()]
    params = [r.alpha for r in roundings]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.iters, 1), eta_min=0.0)
        if cfg.lr_schedule == "cosine" else None
    )
    N, batch = x_N.shape[0], min(cfg.batch_size, x_N.shape[0])
    rec = torch.zeros(())
    t0 = time.perf_counter()
    # Iterations and loss of the unit as it fits: at the paper's 5000 iterations one unit is minutes long on a GPU
    # (hours on a CPU), and the per-unit line alone would leave a SLURM log silent that long.
    with Progress("adaround", total=cfg.iters, unit="it") as progress:
        for it in range(cfg.iters):
            rows = torch.randperm(N, generator=gen)[:batch].to(x_N.device)
            with gemm_precision(cfg.gemm_precision, x_N.device):
                out = unit.forward(x_N[rows])
            rec = unit_loss(out, y_N[rows], weight_L)
            beta = cfg.beta(it + 1)  # the released schedule counts iterations from 1
            loss = rec if beta is None or cfg.weight_reg == 0 else rec + cfg.weight_reg * _regularizer(roundings, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if (it + 1) % NAN_CHECK_EVERY == 0 and not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"reconstruction unit {unit.name}: loss became {loss.item()} at iteration {it}")
            if (it + 1) % PROGRESS_EVERY == 0 or it + 1 == cfg.iters:
                # .item() synchronises a GPU, so the loss is read only when progress is reported
                progress.update((it % PROGRESS_EVERY) + 1, loss=float(rec.detach()))
    if x_N.is_cuda:
        torch.cuda.synchronize(x_N.device)
    fit_s = time.perf_counter() - t0

    with torch.no_grad():
        num_weights = sum(r.alpha.numel() for r in roundings)
        reg_end = _regularizer(roundings, cfg.b_end).item() / max(num_weights, 1)
    for linear, r in zip(unit.linears.values(), roundings):
        r.harden()
        r.alpha.requires_grad_(False)  # decided: nothing learns it any more
        linear.weight_quantizer.invalidate_cache()
    t_score = time.perf_counter()
    loss_after = score(unit, x_N, y_N, weight_L)
    score_s += time.perf_counter() - t_score
    return UnitStats(
        name=unit.name, loss_rtn=loss_rtn, loss_after=loss_after,
        loss_soft_end=float(rec.detach()), reg_end=reg_end, num_weights=num_weights, iters=cfg.iters,
        fit_s=fit_s, s_per_iter=fit_s / max(cfg.iters, 1), score_s=score_s,
    )
