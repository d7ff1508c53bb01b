"""``python -m varq.bench`` (``make bench``): sampling throughput per model × method × dtype, written to JSON.

Speed is measured here, never asserted in tests. On a CPU machine the default measures var_digits; on a GPU pass
``--models var_d16 var_d30 --dtypes fp16 bf16 --batch-size 64`` (random weights: throughput does not depend on
the weights, so no checkpoint is needed).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from varq.results import provenance, write_json_atomic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sampling(model: str, quant: str, bits: str, dtype: str, batch_size: int, reps: int, device: torch.device) -> dict:
    from varq.config import compose_run_config
    from varq.models.factory import build_models
    from varq.quant.registry import get_method
    from varq.sample.generate import sampling_dtype
    from varq.sample.sampler import generate

    cfg = compose_run_config([f"model={model}", f"quant={quant}", f"bits={bits}"])
    model_cfg = cfg.model if cfg.model.source != "official" else replace(cfg.model, source="random")
    var, vqvae = build_models(model_cfg, device)
    method = get_method(quant)(cfg.quant)
    if method.needs_calibration:
        raise SystemExit(f"quant={quant} needs calibration; benchmark its sampling from a finished run instead")
    var = method.calibrate(var, None, cfg.bits)
    labels = torch.arange(batch_size, device=device) % var.num_classes
    kw = dict(cfg=1.5, top_k=cfg.eval.top_k, top_p=cfg.eval.top_p, autocast_dtype=sampling_dtype(dtype))
    with torch.inference_mode():
        generate(var, vqvae, labels, rng=torch.Generator(device=device).manual_seed(0), **kw)  # warm-up
        _sync(device)
        times = []
        for rep in range(reps):
            t0 = time.perf_counter()
            generate(var, vqvae, labels, rng=torch.Generator(device=device).manual_seed(rep + 1), **kw)
            _sync(device)
            times.append(time.perf_counter() - t0)
    best = min(times)
    result = {
        "model": model, "quant": quant, "bits": bits if quant != "fp16" else "fp16", "dtype": dtype,
        "batch_size": batch_size, "reps": reps, "seconds_per_batch": times, "images_per_s": batch_size / best,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["var_digits"])
    parser.add_argument("--quants", nargs="+", default=["fp16", "rtn"])
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: fp32 on CPU, fp16 and bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)

    from varq.pipeline import resolve_device

    device = resolve_device(args.device)
    dtypes = args.dtypes or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    results = []
    for model in args.models:
        for quant in args.quants:
            for dtype in dtypes:
                r = bench_sampling(model, quant, args.bits, dtype, args.batch_size, args.reps, device)
                results.append(r)
                print(f"{model:12s} {quant:8s} {r['bits']:5s} {dtype:5s} batch {args.batch_size:4d}: "
                      f"{r['images_per_s']:8.1f} img/s", flush=True)
    out = Path(args.out) / f"sampling_{device.type}.json"
    write_json_atomic(out, {"results": results, **provenance(device, ",".join(dtypes))})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
