"""`reconstruct`: BRECQ-style AdaRound over every unit of a fake-quantized VAR, capturing inputs once.

Both models are advanced through the calibration set stage by stage (the adapter's `Stream`): the FP model once, for the
targets (and, with ``inputs="fp"``, the unit inputs), and with ``inputs="quant"`` the quantized model incrementally,
each stage run once after its units are hardened. No unit re-runs the model prefix, so capture costs about one
forward pass of each model in total (DESIGN.md, Performance).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict

import torch
from torch import nn

from varq.models.adapter import Stage
from varq.models.lookup import adapter_for
from varq.progress import Progress
from varq.quant.model import quant_enabled
from varq.quant.recon.adaround import Unit, fit_unit
from varq.quant.recon.config import ReconConfig
from varq.quant.recon.units import capture_input, fp_stage_output, map_rows, run_linear, stage_linears, weights_once

__all__ = ["reconstruct"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _only_rounding_trains(var: nn.Module) -> Iterator[None]:
    # The unit's FP weights, biases and temperatures must not collect gradients (and should not cost their
    # computation); AdaRound α created during reconstruction is a fresh Parameter and trains.
    saved = [(p, p.requires_grad) for p in var.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _check_attention_pass(adapter, cfg: ReconConfig) -> None:
    # refused before the first unit: a fit must not run for an hour and then stop at the attention
    if cfg.attention_pass == "cached" or cfg.units != "block":
        return
    check = getattr(adapter, "check_attention_pass", None)
    if check is None:
        raise ValueError(f"attention_pass={cfg.attention_pass}: {type(adapter).__name__} has only the cached "
                         f"attention pass; set attention_pass=cached")
    check(cfg.attention_pass)


def _stage_units(
    qvar: nn.Module, fp_var: nn.Module, stage: Stage, x_in: torch.Tensor, x_fp: torch.Tensor,
    y_fp: torch.Tensor, cfg: ReconConfig,
) -> Iterator[tuple[Unit, torch.Tensor, torch.Tensor]]:
    """(unit, inputs, FP targets) of a stage; lazily, so a later Linear's input sees the earlier ones hardened."""
    linears = stage_linears(qvar, stage)
    if not linears:
        return
    q_adapter = adapter_for(qvar)
    scales_L = q_adapter.stage_output_scales(stage)
    if cfg.units == "block" or stage.kind not in ("attn", "ffn"):
        # the vectorised attention pass is asked for only when chosen, so an adapter without one runs unchanged
        pass_kw = {"attention_pass": cfg.attention_pass} if stage.kind == "attn" and cfg.attention_pass != "cached" else {}

        def forward(x: torch.Tensor) -> torch.Tensor:
            with weights_once(linears):
                return q_adapter.run_stage(stage, x, **pass_kw)

        yield Unit(stage.name, linears, forward, scales_L), x_in, y_fp
        return
    # layer mode inside attention / FFN: each Linear alone, its input captured by running the stage
    for fqn, qlinear in linears.items():
        fp_linear = fp_var.get_submodule(fqn)
        with quant_enabled(fp_var, weights=False, activations=False):
            u_fp = capture_input(fp_var, stage, x_fp, fp_linear, kv_cached=False)
            target = map_rows(fp_linear, u_fp)
        u_in = u_fp if cfg.inputs == "fp" else capture_input(qvar, stage, x_in, qlinear, kv_cached=True)
        # tokens keep their order through the stage, so the Linear's outputs have the stage's token scales
        yield Unit(fqn, {fqn: qlinear}, functools.partial(run_linear, qvar, qlinear, scale_idx_L=scales_L),
                   scales_L), u_in, target


def reconstruct(qvar: nn.Module, fp_var: nn.Module, calib_set, cfg: ReconConfig, device) -> dict:
    """Learn the AdaRound rounding of every quantized Linear of ``qvar``, unit by unit, then harden it.

    Args:
        qvar: a model with quantizers installed (`quantize_var`); weight quantizers must be static and frozen. Their
            rounding is replaced by `AdaRoundRounding` initialised from the FP weights. Activation quantizers stay
            as installed and active (dynamic ones need no fitting).
        fp_var: an unquantized copy of the same model (deepcopy before quantizing); it provides the targets.
        calib_set: a `CalibSet`; every sequence contributes a conditional and an unconditional row, as in a CFG
            batch (methods.md §3.5: 256 classes → 512 rows).
        cfg: `ReconConfig`.
        device: where the cached activations live (the models' device).

    Returns:
        stats: ``units`` (per unit: name, RTN and final loss on all rows, iterations, fit time …), ``fit_s`` (the
        optimisation loops), ``score_s`` (the RTN and final loss of every unit on all rows, which the report
        shows), ``capture_s`` (everything else: the stage passes that produce unit inputs and targets, and the
        set-up of each unit), ``total_s``, ``rows`` and ``config``.
    """
    device = torch.device(device)
    t_start = time.perf_counter()
    label_N, teacher_NLC = calib_set.teacher_batch(slice(None), device, with_uncond=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    q_adapter, fp_adapter = adapter_for(qvar), adapter_for(fp_var)
    _check_attention_pass(q_adapter, cfg)
    stages = q_adapter.stages()
    fp_stream = fp_adapter.init_stream(label_N)
    q_stream = q_adapter.init_stream(label_N) if cfg.inputs == "quant" else None
    unit_stats: list[dict] = []
    with _only_rounding_trains(qvar), _only_rounding_trains(fp_var), \
            Progress("reconstruct", total=len(stages), unit="stage") as progress:
        for stage in stages:
            x_fp = fp_adapter.stage_input(stage, fp_stream, teacher_NLC)
            y_fp = fp_stage_output(fp_var, stage, x_fp)
            x_in = x_fp if q_stream is None else q_adapter.stage_input(stage, q_stream, teacher_NLC)
            for unit, u_in, target in _stage_units(qvar, fp_var, stage, x_in, x_fp, y_fp, cfg):
                stats = fit_unit(unit, u_in, target, cfg, gen).as_dict()
                log.info("recon %-22s loss %.4g -> %.4g (%d iters, %.1f s)", stats["name"], stats["loss_rtn"],
                         stats["loss_after"], stats["iters"], stats["fit_s"])
                unit_stats.append(stats)
                progress.update(0, unit=stats["name"], loss_rtn=stats["loss_rtn"], loss=stats["loss_after"],
                                iters=stats["iters"])
            if q_stream is not None:
                q_adapter.advance(stage, q_stream, map_rows(functools.partial(q_adapter.run_stage, stage), x_in))
            fp_adapter.advance(stage, fp_stream, y_fp)
            progress.update(1)
    total_s = time.perf_counter() - t_start
    fit_s = sum(s["fit_s"] for s in unit_stats)
    score_s = sum(s["score_s"] for s in unit_stats)
    return {
        "units": unit_stats, "rows": int(label_N.shape[0]), "config": asdict(cfg),
        "fit_s": fit_s, "score_s": score_s, "capture_s": total_s - fit_s - score_s, "total_s": total_s,
    }
