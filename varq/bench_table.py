"""The markdown tables of a `varq.bench` report (the README's Benchmarks section is pasted from them)."""

from __future__ import annotations

__all__ = ["markdown_table"]


def _f(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _yes_no(flag: bool | None) -> str:
    # results written before a check existed have no value for it
    return "–" if flag is None else ("yes" if flag else "NO")


def markdown_table(report: dict) -> str:
    out: list[str] = []
    if report.get("sampling"):
        out += ["| model | dtype | batch | official s/batch | varq s/batch | varq img/s | varq vs official | "
                "identical to reference loop | logits = official | max image Δ vs official | fast decoder s/batch | "
                "fast decoder vs official | fast decoder max image Δ | winograd decoder s/batch | "
                "winograd decoder vs official | winograd decoder max image Δ | peak GPU memory (GiB) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["sampling"]:
            s = r["samplers"]
            off = s.get("official", {})
            out.append(
                f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {_f(off.get('median_s'))} | "
                f"{_f(s['varq']['median_s'])} | {_f(s['varq']['images_per_s'])} | "
                f"{_f(r.get('speedup_vs_official'))}× | {'yes' if r['varq_identical_to_reference_loop'] else 'NO'} | "
                f"{_yes_no(r.get('logits_identical_to_official'))} | {_f(r.get('max_abs_image_diff_vs_official'), '.2g')} | "
                # results written before eval.decoder=fast (or winograd) existed have no sampler for it
                + "".join(f"{_f(s.get(f'varq_{mode}_decoder', {}).get('median_s'))} | "
                          f"{_f(r.get(f'{mode}_decoder_speedup_vs_official'))}× | "
                          f"{_f(r.get(f'{mode}_decoder_max_abs_image_diff'), '.2g')} | " for mode in ("fast", "winograd"))
                + f"{_f(s['varq'].get('peak_memory_gib'))} |"
            )
        out.append("")
        # results written before the decoders were timed apart have no "decoders"
        dec_rows = [r for r in report["sampling"] if r.get("decoders")]
        if dec_rows:
            out += ["| model | dtype | batch | official decoder s | varq decoder s | varq fast decoder s | "
                    "varq winograd decoder s |", "|---|---|---|---|---|---|---|"]
            for r in dec_rows:
                d = r["decoders"]
                out.append(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | "
                           f"{_f(d.get('official', {}).get('median_s'))} | {_f(d['varq']['median_s'])} | "
                           f"{_f(d['varq_fast']['median_s'])} | {_f(d.get('varq_winograd', {}).get('median_s'))} |")
            out.append("")
    if report.get("fake_quant"):
        out += ["| model | method | bits | FP s/batch | fake-quant s/batch | fake-quant / FP | fused / FP |",
                "|---|---|---|---|---|---|---|"]
        for r in report["fake_quant"]:
            # the compiled quantizers are timed only with --fused-quantizers; a "NO" means other images
            fused = "–" if "fused" not in r else (
                f"{_f(r['fused_slowdown_vs_fp'])}×" + ("" if r.get("fused_identical", True) else " (NO: images differ)"))
            out.append(f"| {r['model']} | {r['quant']} | {r['bits']} | {_f(r['fp']['median_s'])} | "
                       f"{_f(r['fake_quant']['median_s'])} | {_f(r['slowdown_vs_fp'])}× | {fused} |")
        out.append("")
    if report.get("fp8"):
        out += ["| model | method | bits | dtype | FP s/batch | fake-quant s/batch | fp8 s/batch | fp8 vs fake | fp8 vs FP "
                "| FP8 tensor cores |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["fp8"]:
            out.append(f"| {r['model']} | {r['quant']} | {r['bits']} | {r['dtype']} | {_f(r['fp']['median_s'])} | "
                       f"{_f(r['fake_quant']['median_s'])} | {_f(r['fp8']['median_s'])} | {_f(r['fp8_vs_fake'])}× | "
                       f"{_f(r['fp8_vs_fp'])}× | {'yes' if r['fp8_tensor_cores'] else 'no (emulated)'} |")
        out.append("")
    if report.get("calibration"):
        out += ["| model | unit GEMMs, attention pass | rows × iters | capture s | capture / FP generation | scoring s | fit s "
                "| s/iter by unit kind | projected at 5,000 iters, 512 rows |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["calibration"]:
            kinds = ", ".join(f"{k} {v['s_per_iter']:.3f}" for k, v in r["unit_kinds"].items())
            # results written before scoring was timed apart have no score_s (it was inside capture_s)
            # results written before the vectorised attention pass existed ran the cached one
            unit = f"{r.get('gemm_precision', 'fp32')}, {r.get('attention_pass', 'cached')} attention"
            out.append(f"| {r['model']} | {unit} | {r['rows']} × {r['iters']} | "
                       f"{_f(r['capture_s'], '.1f')} | "
                       f"{_f(r.get('capture_vs_fp_generation'))}× | {_f(r.get('score_s'), '.1f')} | "
                       f"{_f(r['fit_s'], '.1f')} | {kinds} | {_f(r['projected_paper_settings']['total_min'], '.0f')} min |")
        out.append("")
    if report.get("metrics"):
        out += ["| model | extractor | images | seconds | projected 50k |", "|---|---|---|---|---|"]
        for r in report["metrics"]:
            if "skipped" in r:
                out.append(f"| {r['model']} | – | {r['n']} | skipped: {r['skipped'][:80]} | – |")
            else:
                out.append(f"| {r['model']} | {r['extractor']} | {r['n']} | {_f(r['total_s'])} | "
                           f"{_f(r['projected_50k_s'], '.0f')} s |")
        out.append("")
    return "\n".join(out)
