"""``python -m varq.bench`` (``make bench``): side-by-side speed of varq and the official VAR code, written to JSON.

Four measurements per model, all in one process on one device (speed is measured here, never asserted in tests):

* **sampling**: varq's sampler against the official ``autoregressive_infer_cfg`` (``--reference-repo``, a checkout
  of github.com/FoundationVision/VAR) on the same weights, labels, seeds and settings, repetitions alternating
  between the samplers; the ratio, images/s and peak memory;
* **fake quantization**: varq FP against each method's fake-quantized model (``--quants``), alternating;
* **calibration** (``--calib-iters`` > 0): ``ours``' AdaRound reconstruction split into capture and fit, seconds
  per iteration per unit kind, and the projected time at the paper's settings (5,000 iterations, 512 rows);
* **metrics**: feature extraction and FID of ``--metric-samples`` images with the model's feature extractor.

Models whose weights come from official checkpoints run on random weights (speed does not depend on them). On a
CPU the default is var_digits and d16 at batch 4 in fp32; on a GPU pass ``--models var_d16 var_d30 --batch-size 64
--dtypes bf16``. The results go to ``results/bench/bench_<device>.json`` and, as a markdown table,
``results/bench/bench_<device>.md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from varq.atomic import write_json_atomic
from varq.bench_table import markdown_table
from varq.results import provenance

PAPER_ITERS = 5000  # AdaRound iterations per unit (methods.md §3.6)
PAPER_ROWS = 512  # 256 calibration sequences, each with its unconditional copy (methods.md §3.5)
# the non-default eval.decoder values timed next to the reference decoder (a sampler and the decoder alone each);
# winograd computes what fast does on CUDA (cuDNN picks its own algorithms), so a GPU run times fast alone
DECODER_VARIANTS = {"cpu": ("fast", "winograd"), "cuda": ("fast",)}
THETA_FOR_TIMING = 0.01  # shift-and-sum costs the same for any finite θ (every row is computed, then selected)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _autocast(device: torch.device, dtype: str):
    from varq.sample.batches import sampling_dtype
    from varq.sample.sampler import autocast_context

    return autocast_context(device, sampling_dtype(dtype))


def build_fp(model: str, device: torch.device):
    """(run config, FP VAR, VQ-VAE); checkpoint-backed models get varq's random weights."""
    from varq.compose import compose_run_config
    from varq.models.factory import build_models

    cfg = compose_run_config([f"model={model}"])
    model_cfg = cfg.model if cfg.model.source != "official" else replace(cfg.model, source="random")
    var, vqvae = build_models(model_cfg, device)
    return cfg, var.eval(), vqvae.eval()


def _top_k(top_k: int, var) -> int:
    # k >= V keeps everything (varq) but fails in the official sampler's topk: pass 0, which means the same
    return top_k if top_k < var.V else 0


def time_alternating(
    samplers: dict[str, Callable[[int], torch.Tensor]], reps: int, device: torch.device, warmup: bool = True
) -> dict:
    """Run every sampler once to warm up (unless ``warmup`` is False), then ``reps`` rounds; the order rotates each
    round (no sampler always runs first on a warm cache). Returns per sampler: wall seconds of every rep, the
    process CPU seconds of every rep (on a shared CPU less noisy than wall time: other users' load barely moves it)
    and the peak memory (GPU)."""
    names = list(samplers)
    out = {n: {"seconds": [], "cpu_seconds": [], "peak_memory_gib": None} for n in names}
    # no_grad, not inference_mode: inference mode switches off autocast's cast cache, so under bf16/fp16 every Linear
    # would cast its fp32 weight again at every call. Both samplers are no_grad functions and run that way in use.
    with torch.no_grad():
        for n in names if warmup else ():
            samplers[n](0)
        _sync(device)
        for rep in range(reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for n in order:
                _peak_reset(device)
                t0, c0 = time.perf_counter(), time.process_time()
                samplers[n](rep + 1)
                _sync(device)
                out[n]["seconds"].append(time.perf_counter() - t0)
                out[n]["cpu_seconds"].append(time.process_time() - c0)
                peak = _peak_gib(device)
                if peak is not None:
                    out[n]["peak_memory_gib"] = max(out[n]["peak_memory_gib"] or 0.0, peak)
    return out


def _summary(timing: dict, batch_size: int) -> dict:
    med = statistics.median(timing["seconds"])
    cpu = statistics.median(timing["cpu_seconds"]) if timing.get("cpu_seconds") else None
    return {**timing, "median_s": med, "median_cpu_s": cpu, "images_per_s": batch_size / med}


def bench_sampling(model: str, dtype: str, batch_size: int, reps: int, device: torch.device,
                   reference_repo: str | None, top_k: int, top_p: float, warmup: bool = True) -> dict:
    """varq's sampler (its reference loop, and with ``eval.decoder=fast`` and ``winograd``) against the official one
    on the same weights and seeds."""
    from varq.models.fast_decoder import set_decoder
    from varq.sample.sampler import generate

    cfg, var, vqvae = build_fp(model, device)
    labels = torch.arange(batch_size, device=device) % var.num_classes
    kw = dict(cfg=1.5, top_k=_top_k(top_k, var), top_p=top_p)
    last: dict[str, torch.Tensor] = {}

    # each decoder variant on its own copy of the VQ-VAE: switching layouts inside a timed call would time the switch
    variants = DECODER_VARIANTS[device.type]
    variant_vqvaes = {}
    for mode in variants:
        variant_vqvaes[mode] = copy.deepcopy(vqvae)
        set_decoder(variant_vqvaes[mode], mode)

    def varq_sampler(reference_loop: bool, name: str, vqvae_=vqvae):
        def run(seed: int):
            with _autocast(device, dtype):
                img = generate(var, vqvae_, labels, rng=torch.Generator(device=device).manual_seed(seed),
                               reference_loop=reference_loop, **kw)
            last[name] = img
            return img
        return run

    samplers = {"varq": varq_sampler(False, "varq"), "varq_reference_loop": varq_sampler(True, "varq_reference_loop"),
                **{f"varq_{mode}_decoder": varq_sampler(False, f"varq_{mode}_decoder", v)
                   for mode, v in variant_vqvaes.items()}}
    result = {"model": model, "dtype": dtype, "batch_size": batch_size, "reps": reps, "top_k": top_k, "top_p": top_p}
    if reference_repo is not None:
        from varq.bench_reference import load_reference

        ref = load_reference(reference_repo, var, vqvae, cfg.model.vae, device)
        result["official_vqvae"] = ref.vqvae_source

        def official(seed: int):
            with _autocast(device, dtype):
                last["official"] = ref(labels, seed, **kw)
            return last["official"]

        samplers["official"] = official
    timing = time_alternating(samplers, reps, device, warmup)
    result["samplers"] = {n: _summary(t, batch_size) for n, t in timing.items()}
    result["decoders"] = bench_decoders(
        {"varq": vqvae, **{f"varq_{mode}": v for mode, v in variant_vqvaes.items()},
         **({"official": ref.vqvae} if reference_repo is not None else {})},
        batch_size, var.patch_nums[-1], dtype, device, reps, warmup)
    fast = result["samplers"]["varq"]["median_s"]
    result["varq_identical_to_reference_loop"] = bool(torch.equal(last["varq"], last["varq_reference_loop"]))
    for mode in variants:
        # a decoder variant decodes the same tokens (same seed, same transformer), so only its rounding shows here
        result[f"{mode}_decoder_max_abs_image_diff"] = float((last[f"varq_{mode}_decoder"] - last["varq"]).abs().max())
    if "official" in last:
        result["speedup_vs_official"] = result["samplers"]["official"]["median_s"] / fast
        for mode in variants:
            result[f"{mode}_decoder_speedup_vs_official"] = (result["samplers"]["official"]["median_s"]
                                                             / result["samplers"][f"varq_{mode}_decoder"]["median_s"])
        result["max_abs_image_diff_vs_official"] = float((last["varq"].float() - last["official"].float()).abs().max())
        result["max_abs_logit_diff_vs_official"] = _logit_diff_vs_official(var, vqvae, ref, labels[:2], kw, device, dtype)
        result["logits_identical_to_official"] = result["max_abs_logit_diff_vs_official"] == 0.0
    return result


def bench_decoders(vaes: dict, batch_size: int, side: int, dtype: str, device: torch.device, reps: int,
                   warmup: bool = True) -> dict:
    """The decoders alone (``fhat_to_img`` of one random latent), alternating like the samplers: the share of a
    sampler's time that is the decoder's, e.g. varq's reference and fast decoders and the official one."""
    first = next(iter(vaes.values()))
    gen = torch.Generator().manual_seed(0)
    f_hat = torch.randn(batch_size, first.Cvae, side, side, generator=gen).to(device)

    def decoder(vae):
        def run(_seed: int) -> torch.Tensor:
            with _autocast(device, dtype):
                return vae.fhat_to_img(f_hat)
        return run

    timing = time_alternating({n: decoder(v) for n, v in vaes.items()}, reps, device, warmup)
    return {n: _summary(t, batch_size) for n, t in timing.items()}


def _logit_diff_vs_official(var, vqvae, ref, labels: torch.Tensor, kw: dict, device: torch.device, dtype: str) -> float:
    """Largest |Δ| between the two samplers' logits (both CFG halves, every scale) in one untimed run of ``labels``.

    The images alone can hide or overstate a difference: the official code maps its decoder output to [0, 1] in the
    autocast dtype (bf16 keeps 8 bits there), varq in fp32, so bf16 images differ by up to 2^-9 with equal tokens.
    """
    from varq.sample.sampler import generate

    varq_logits: list[torch.Tensor] = []
    official_logits: list[torch.Tensor] = []
    handle = ref.var.head.register_forward_hook(lambda _m, _a, out: official_logits.append(out.float()))
    try:
        with torch.no_grad(), _autocast(device, dtype):
            generate(var, vqvae, labels, rng=torch.Generator(device=device).manual_seed(0),
                     on_logits=lambda _si, logits: varq_logits.append(logits.float()), **kw)
            ref(labels, 0, **kw)
    finally:
        handle.remove()
    if len(varq_logits) != len(official_logits):
        return math.inf
    return max(float((a - b).abs().max()) if a.shape == b.shape else math.inf
               for a, b in zip(varq_logits, official_logits))


def quantized_model(var, quant: str, bits: str):
    """``var`` fake-quantized by ``quant`` without data: rtn as calibrated; ours' quantizers with θ fixed."""
    from varq.compose import compose_run_config
    from varq.quant.registry import get_method

    cfg = compose_run_config([f"quant={quant}", f"bits={bits}"])
    if quant.startswith("ours"):
        from varq.quant.methods._framework import framework_policy
        from varq.quant.model import quantize_var
        from varq.quant.shift_sum import install_shift_sum

        qvar = quantize_var(var, framework_policy(cfg.quant), cfg.bits)
        install_shift_sum(qvar, THETA_FOR_TIMING, cfg.quant.max_order)
        return qvar
    method = get_method(quant)(cfg.quant)
    if method.needs_calibration:
        raise SystemExit(f"--quants {quant}: needs calibration data; the benchmark times rtn and ours (fixed θ)")
    return method.calibrate(var, None, cfg.bits)


def _fp_model_and_sampler(model: str, dtype: str, batch_size: int, device: torch.device, top_k: int, top_p: float):
    """(FP VAR, sampler(model_) → run(seed)): every model variant is timed on the same labels, VQ-VAE and settings."""
    from varq.sample.sampler import generate

    _, var, vqvae = build_fp(model, device)
    labels = torch.arange(batch_size, device=device) % var.num_classes
    kw = dict(cfg=1.5, top_k=_top_k(top_k, var), top_p=top_p)

    def sampler(model_):
        def run(seed: int):
            with _autocast(device, dtype):
                return generate(model_, vqvae, labels, rng=torch.Generator(device=device).manual_seed(seed), **kw)
        return run

    return var, sampler


def _with_fused_quantizers(run: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """``run`` with the compiled quantizers on (`varq.quant.fused`), off again after every call."""
    from varq.quant.fused import use_fused_quantizers

    def fused(seed: int) -> torch.Tensor:
        previous = use_fused_quantizers(True)
        try:
            return run(seed)
        finally:
            use_fused_quantizers(previous)
    return fused


def bench_fake_quant(model: str, quants: list[str], bits: str, dtype: str, batch_size: int, reps: int,
                     device: torch.device, top_k: int, top_p: float, warmup: bool = True,
                     fused: bool = False) -> list[dict]:
    """Per method: FP and fake-quantized sampling, alternating, on the same weights and seeds; with ``fused`` also
    the fake-quantized model on the compiled quantizers (the warm-up run compiles), whose images must be identical."""
    var, sampler = _fp_model_and_sampler(model, dtype, batch_size, device, top_k, top_p)
    rows = []
    for quant in quants:
        qvar = quantized_model(copy.deepcopy(var), quant, bits)
        samplers = {"fp": sampler(var), quant: sampler(qvar)}
        if fused:
            samplers["fused"] = _with_fused_quantizers(sampler(qvar))
        timing = time_alternating(samplers, reps, device, warmup)
        fp, fq = _summary(timing["fp"], batch_size), _summary(timing[quant], batch_size)
        row = {
            "model": model, "quant": quant, "bits": bits, "dtype": dtype, "batch_size": batch_size, "reps": reps,
            "fp": fp, "fake_quant": fq, "slowdown_vs_fp": fq["median_s"] / fp["median_s"],
            "cpu_slowdown_vs_fp": fq["median_cpu_s"] / fp["median_cpu_s"] if fp["median_cpu_s"] else None,
        }
        if fused:
            fz = _summary(timing["fused"], batch_size)
            with torch.no_grad():
                same = torch.equal(samplers[quant](0), samplers["fused"](0))
            row.update(fused=fz, fused_slowdown_vs_fp=fz["median_s"] / fp["median_s"], fused_identical=bool(same))
        rows.append(row)
        del qvar
    return rows


def bench_fp8(model: str, bits_list: list[str], dtype: str, batch_size: int, reps: int, device: torch.device,
              top_k: int, top_p: float, warmup: bool = True) -> list[dict]:
    """rtn per bit-width: FP, fake-quantized and ``backend=fp8`` sampling, alternating, on the same weights and seeds.

    Meant for GPUs with FP8 tensor cores (compute capability ≥ 8.9); elsewhere the FP8 GEMM is emulated in fp32 and
    its time says nothing about the format (the row records which GEMM ran).
    """
    from varq.quant.fp8 import apply_fp8_backend, fp8_mode, has_fp8_tensor_cores

    var, sampler = _fp_model_and_sampler(model, dtype, batch_size, device, top_k, top_p)
    rows = []
    for bits in bits_list:
        w_bits, a_bits = _bit_widths(bits)
        fp8_mode(w_bits, a_bits)  # refuses a pair the backend does not serve
        qvar = quantized_model(copy.deepcopy(var), "rtn", bits)
        fp8_var = copy.deepcopy(qvar)
        swapped = apply_fp8_backend(fp8_var, w_bits, a_bits)
        timing = time_alternating({"fp": sampler(var), "fake": sampler(qvar), "fp8": sampler(fp8_var)}, reps,
                                  device, warmup)
        fp, fake, fp8 = (_summary(timing[n], batch_size) for n in ("fp", "fake", "fp8"))
        rows.append({
            "model": model, "quant": "rtn", "bits": bits, "dtype": dtype, "batch_size": batch_size, "reps": reps,
            "fp8_linears": len(swapped), "fp8_tensor_cores": has_fp8_tensor_cores(device),
            "fp": fp, "fake_quant": fake, "fp8": fp8,
            "fp8_vs_fake": fake["median_s"] / fp8["median_s"], "fp8_vs_fp": fp["median_s"] / fp8["median_s"],
        })
        del qvar, fp8_var
    return rows


def _bit_widths(label: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a label such as ``w8a8``; ValueError for anything else."""
    w, sep, a = label.removeprefix("w").partition("a")
    if not (label.startswith("w") and sep and w.isdigit() and a.isdigit()):
        raise ValueError(f"not a bit-width label like w8a8: {label!r}")
    return int(w), int(a)


def _unit_kind(name: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "", name).replace(".", "_")


def bench_calibration(model: str, iters: int, sequences: int, device: torch.device,
                      gemm_precision: str = "fp32", attention_pass: str = "cached") -> dict:
    """``ours`` W4A4 reconstruction with a few iterations: capture vs fit, s/iteration per unit kind, projection.

    ``gemm_precision`` is ``quant.gemm_precision`` (the unit GEMMs on CUDA: fp32, tf32 or bf16; α stays fp32);
    ``attention_pass`` is ``quant.attention_pass`` (attention units scale by scale, or one vectorised pass).
    """
    from varq.calib import CalibSet
    from varq.compose import compose_run_config
    from varq.quant.methods._framework import framework_policy
    from varq.quant.model import quantize_var
    from varq.quant.recon import reconstruct

    cfg, var, vqvae = build_fp(model, device)
    qcfg = compose_run_config(["quant=ours", "bits=w4a4", f"quant.iters={iters}",
                               f"+quant.gemm_precision={gemm_precision}", f"quant.attention_pass={attention_pass}"])
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(var.V, (sequences, pn * pn), generator=gen).to(device) for pn in var.patch_nums]
    labels = torch.arange(sequences, device=device) % var.num_classes
    with torch.no_grad():
        teacher = vqvae.idxBl_to_var_input(idx)
    calib = CalibSet(labels_N=labels, seeds_N=torch.zeros(sequences, dtype=torch.long), idx_per_scale=idx,
                     teacher_input_NLC=teacher, num_classes=var.num_classes, cfg=1.5)
    fp_var = copy.deepcopy(var)
    # the yardstick of capture: one FP generation (CFG, so 2 rows per sequence, and the decode) of the same rows
    fp_gen = time_alternating({"fp": lambda seed: _generate_fp(var, vqvae, labels, seed)}, 1, device, warmup=False)
    qvar = quantize_var(var, framework_policy(qcfg.quant), qcfg.bits)
    recon_cfg = qcfg.quant.recon_config()
    # The first torch.optim.Adam of a process imports torch._dynamo (about 1 s): a one-time cost, not capture
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    _sync(device)
    cpu0 = time.process_time()
    stats = reconstruct(qvar, fp_var, calib, recon_cfg, device)
    cpu_total = time.process_time() - cpu0
    per_kind: dict[str, list[float]] = {}
    for unit in stats["units"]:
        if unit["iters"] > 0:
            per_kind.setdefault(_unit_kind(unit["name"]), []).append(unit["fit_s"] / unit["iters"])
    kinds = {k: {"units": len(v), "s_per_iter": statistics.mean(v)} for k, v in per_kind.items()}
    rows = stats["rows"]
    projected_fit = sum(k["units"] * k["s_per_iter"] for k in kinds.values()) * PAPER_ITERS
    # the stage passes and the scoring both scale with the rows
    projected_capture = (stats["capture_s"] + stats["score_s"]) * PAPER_ROWS / rows
    return {
        "model": model, "method": "ours", "bits": "w4a4", "iters": iters, "rows": rows, "gemm_precision": gemm_precision,
        "attention_pass": attention_pass,
        "capture_s": stats["capture_s"], "score_s": stats["score_s"], "fit_s": stats["fit_s"],
        "total_s": stats["total_s"],
        "fp_generation_s": fp_gen["fp"]["seconds"][0], "fp_generation_cpu_s": fp_gen["fp"]["cpu_seconds"][0],
        "capture_vs_fp_generation": stats["capture_s"] / fp_gen["fp"]["seconds"][0],
        "capture_and_score_vs_fp_generation": (stats["capture_s"] + stats["score_s"]) / fp_gen["fp"]["seconds"][0],
        "reconstruct_cpu_s": cpu_total,
        "unit_kinds": kinds,
        "projected_paper_settings": {
            "iters": PAPER_ITERS, "rows": PAPER_ROWS, "capture_and_score_s": projected_capture, "fit_s": projected_fit,
            "total_min": (projected_capture + projected_fit) / 60,
        },
    }


def _generate_fp(var, vqvae, labels: torch.Tensor, seed: int) -> torch.Tensor:
    from varq.sample.sampler import generate

    gen = torch.Generator(device=labels.device).manual_seed(seed)
    return generate(var, vqvae, labels, rng=gen, cfg=1.5, top_k=_top_k(900, var), top_p=0.95)


def bench_metrics(model: str, n: int, device: torch.device) -> dict:
    """Features and FID of ``n`` random uint8 images with the model's extractor (time only; the numbers are noise)."""
    from varq.compose import compose_run_config
    from varq.metrics.fidelity import compute_features, fid_from_features

    cfg = compose_run_config([f"model={model}"])
    size = cfg.model.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    try:
        feats = compute_features(images, cfg.model.feature_extractor, device=device)
    except Exception as err:  # e.g. Inception weights not present on an offline machine
        return {"model": model, "n": n, "skipped": f"{type(err).__name__}: {err}"[:300]}
    t_feat = time.perf_counter() - t0
    half = n // 2
    fid_from_features(feats["features"][:half], feats["features"][half:])
    total = time.perf_counter() - t0
    return {"model": model, "n": n, "extractor": cfg.model.feature_extractor, "features_s": t_feat, "total_s": total,
            "projected_50k_s": total * 50_000 / n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", default=None, help="checkout of github.com/FoundationVision/VAR")
    parser.add_argument("--models", nargs="+", default=None, help="default: var_digits var_d16 (CPU), var_d16 var_d30 (GPU)")
    parser.add_argument("--quants", nargs="+", default=["rtn", "ours"])
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 64 on CUDA")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of every sampler")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--calib-iters", type=int, default=2, help="AdaRound iterations per unit to time; 0: skip")
    parser.add_argument("--calib-gemm-precision", nargs="+", default=["fp32"], choices=["fp32", "tf32", "bf16"],
                        help="quant.gemm_precision of the timed calibration, one run each (CUDA only changes anything)")
    parser.add_argument("--calib-attention-pass", nargs="+", default=["cached"], choices=["cached", "vectorised"],
                        help="quant.attention_pass of the timed calibration, one run each (with every GEMM precision)")
    parser.add_argument("--calib-sequences", type=int, default=2, help="calibration sequences (2 rows each)")
    parser.add_argument("--metric-samples", type=int, default=256, help="0: skip the metrics timing")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["sampling", "fake_quant", "fp8", "calibration", "metrics"])
    parser.add_argument("--fp8-bits", nargs="+", default=["w8a8", "w4a4"],
                        help="rtn bit-widths timed on backend=fp8 (on CUDA; on a CPU only with --fp8-emulated)")
    parser.add_argument("--fp8-emulated", action="store_true",
                        help="time backend=fp8 without FP8 tensor cores too (fp32 emulation: checks the section runs)")
    parser.add_argument("--fused-quantizers", action="store_true",
                        help="also time fake quantization on the compiled quantizers (eval.fused_quantizers)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse (varq.sample.cpu_memory); affects every sampler")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--name", default=None, help="file stem of the JSON and table (default: bench_<device>)")
    args = parser.parse_args(argv)
    if args.reps < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--reps and --batch-size must be >= 1")
    if args.reference_repo is not None and not (Path(args.reference_repo) / "models" / "var.py").is_file():
        parser.error(f"--reference-repo {args.reference_repo}: no models/var.py there; pass a checkout of "
                     "github.com/FoundationVision/VAR")
    from varq.quant.fp8 import fp8_mode

    for bits in args.fp8_bits:
        try:
            fp8_mode(*_bit_widths(bits))
        except ValueError as err:
            parser.error(f"--fp8-bits {bits}: {err}")

    from varq.pipeline import resolve_device

    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reuse = False
    if args.reuse_freed_memory:
        from varq.sample.cpu_memory import keep_freed_memory

        reuse = keep_freed_memory()
    cuda = device.type == "cuda"
    models = args.models or (["var_d16", "var_d30"] if cuda else ["var_digits", "var_d16"])
    dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    batch = args.batch_size or (64 if cuda else 4)
    report: dict = {"sampling": [], "fake_quant": [], "fp8": [], "calibration": [], "metrics": [], "note": args.note,
                    "threads": torch.get_num_threads(), "device_name": _device_name(device), "reps": args.reps,
                    "warmup": not args.no_warmup, "reuse_freed_memory": reuse,
                    "command": "python -m varq.bench " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out) / f"{args.name or 'bench_' + device.type}.json"

    def save() -> None:  # after every section, so a long run that is stopped keeps what it measured
        report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        write_json_atomic(out, {**report, **provenance(device, ",".join(dtypes))})
        out.with_suffix(".md").write_text(markdown_table(report))

    for model in models:
        for dtype in dtypes:
            if "sampling" not in args.skip:
                r = bench_sampling(model, dtype, batch, args.reps, device, args.reference_repo, args.top_k, args.top_p,
                                   not args.no_warmup)
                report["sampling"].append(r)
                print(_line_sampling(r), flush=True)
                save()
            if "fake_quant" not in args.skip:
                for r in bench_fake_quant(model, args.quants, args.bits, dtype, batch, args.reps, device,
                                          args.top_k, args.top_p, not args.no_warmup, args.fused_quantizers):
                    report["fake_quant"].append(r)
                    print(f"{model:10s} {r['quant']:6s} {args.bits} {dtype}: {r['slowdown_vs_fp']:.2f}x FP time",
                          flush=True)
                save()
            if "fp8" not in args.skip and (cuda or args.fp8_emulated):
                for r in bench_fp8(model, args.fp8_bits, dtype, batch, args.reps, device, args.top_k, args.top_p,
                                   not args.no_warmup):
                    report["fp8"].append(r)
                    print(f"{model:10s} rtn {r['bits']} {dtype} fp8: {r['fp8_vs_fake']:.2f}x fake-quant speed, "
                          f"{r['fp8_vs_fp']:.2f}x FP speed", flush=True)
                save()
        calibrate = "calibration" not in args.skip and args.calib_iters > 0
        runs = [(p, a) for p in args.calib_gemm_precision for a in args.calib_attention_pass] if calibrate else []
        for precision, attention_pass in runs:
            r = bench_calibration(model, args.calib_iters, args.calib_sequences, device, precision, attention_pass)
            report["calibration"].append(r)
            attn_s = r["unit_kinds"].get("attn", {}).get("s_per_iter", float("nan"))
            print(f"{model:10s} calibration ({precision} unit GEMMs, {attention_pass} attention: {attn_s:.3f} "
                  f"s/iter): capture {r['capture_s']:.1f} s "
                  f"({r['capture_vs_fp_generation']:.2f}x one FP generation of the rows), scoring {r['score_s']:.1f} s, "
                  f"fit {r['fit_s']:.1f} s; projected "
                  f"{r['projected_paper_settings']['total_min']:.1f} min at the paper's settings", flush=True)
            save()
        if "metrics" not in args.skip and args.metric_samples > 0:
            report["metrics"].append(bench_metrics(model, args.metric_samples, device))
    save()
    print(markdown_table(report))
    print(f"wrote {out}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _line_sampling(r: dict) -> str:
    s = r["samplers"]
    line = f"{r['model']:10s} {r['dtype']} batch {r['batch_size']}: varq {s['varq']['images_per_s']:.2f} img/s"
    if "official" in s:
        line += f", official {s['official']['images_per_s']:.2f} img/s, ratio {r['speedup_vs_official']:.2f}x"
        line += " (" + ", ".join(f"eval.decoder={k[:-len('_decoder_speedup_vs_official')]}: {v:.2f}x"
                                 for k, v in r.items() if k.endswith("_decoder_speedup_vs_official")) + ")"
    d = r.get("decoders", {})
    line += "; decoders alone: " + ", ".join(f"{n} {v['median_s']:.2f} s" for n, v in d.items())
    return line if math.isfinite(s["varq"]["images_per_s"]) else line + " (non-finite)"


if __name__ == "__main__":
    main()
