"""Mutation check: each mutant is a small edit that breaks one documented behaviour; the test suite must fail on it.

For every mutant the tree (varq/ with its configs, tests/, pyproject.toml) is copied to a scratch directory, the mutant's
exact original text is replaced (it must occur exactly once, else the script stops: the list is out of date), and
pytest runs there. A mutant is *killed* when pytest fails, *survived* when it passes. Exit status 1 when any mutant
survives, 2 when the list or the unmutated baseline is broken.

By default each mutant runs only the test files it names (the ones meant to catch it), which keeps a full check at a
few minutes on a laptop; ``--full`` runs the whole fast suite for every mutant instead. The unmutated tree is run
first on the same files, so a failing baseline is not mistaken for kills.

    python scripts/mutants.py            # all mutants
    python scripts/mutants.py --list     # names and descriptions
    python scripts/mutants.py --only ss_key_orders_ge --only brecq_no_log2

To add a mutant, append a `Mutant` to MUTANTS (keep the original text short but unique in its file).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("varq", "tests", "pyproject.toml")
PINNED = "tests/quant/test_pinned_behaviour.py"
PARITY = "tests/quant/test_release_parity.py"
PTQ = "tests/quant/test_ptq4arvg.py"
TRANSFORMS = "tests/quant/test_transforms.py"
DGC = "tests/calib/test_dgc.py"
FAST = "tests/quant/test_fast_primitives.py"
AUTOCAST = "tests/models/test_autocast_numerics.py"
FAST_DECODER = "tests/models/test_fast_decoder.py"
WINOGRAD = "tests/models/test_winograd.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    description: str
    tests: tuple[str, ...] = (PINNED, PARITY)  # test files (or node ids) run against it; --full runs the suite


MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- Shift-and-Sum
    Mutant("ss_no_code_clamp", "varq/quant/shift_sum.py",
           "fine = ((torch.clamp(codes, 0, 2**vq.spec.bits - 1) - zero_point) * scale)",
           "fine = ((codes - zero_point) * scale)",
           "shift-and-sum codes are not clamped to [0, 2^b - 1]",
           (PINNED, "tests/quant/test_shift_sum.py")),
    Mutant("ss_key_orders_ge", "varq/quant/shift_sum.py",
           "order += (a > theta * 2**i).long()", "order += (a >= theta * 2**i).long()",
           "key orders count a_j >= 2^i θ instead of a_j > 2^i θ", (PINNED, "tests/quant/test_shift_sum.py")),
    Mutant("ss_half_even", "varq/quant/shift_sum.py",
           "return torch.floor(x + 0.5)", "return torch.round(x)",
           "the shifted copies round half to even instead of half up", (PINNED, "tests/quant/test_shift_sum.py")),
    # ---------------------------------------------------------------- reconstruction engine and brecq
    Mutant("recon_quant_inputs_ignored", "varq/quant/recon/engine.py",
           'q_stream = q_adapter.init_stream(label_N) if cfg.inputs == "quant" else None', "q_stream = None",
           "inputs=quant falls back to FP unit inputs", (PINNED, "tests/quant/test_brecq.py")),
    Mutant("recon_no_warmup", "varq/quant/recon/config.py",
           "if count < warm:\n            return None", "if False:\n            return None",
           "the regulariser is on from the first iteration whatever the warm-up", (PARITY,)),
    Mutant("recon_no_cosine_lr", "varq/quant/recon/adaround.py",
           'if cfg.lr_schedule == "cosine" else None', "if False else None",
           "lr_schedule=cosine keeps a constant learning rate", (PINNED,)),
    Mutant("recon_no_scale_weights", "varq/quant/recon/adaround.py",
           "weight_L = loss_weights(unit.scale_idx_L)", "weight_L = None",
           "the unit loss is a plain mean over tokens instead of a sum of per-scale means", (PINNED,)),
    Mutant("recon_teacher_forced_units", "varq/models/var_adapter.py",
           "x: torch.Tensor, kv_cached: bool = True", "x: torch.Tensor, kv_cached: bool = False",
           "quantized attention units are replayed by teacher forcing instead of the KV cache",
           (PINNED, "tests/quant/test_brecq.py")),
    Mutant("brecq_no_log2", "varq/quant/methods/_framework.py",
           'attention_operand_specs(bits.a_bits, softmax_kind="log2")',
           'attention_operand_specs(bits.a_bits, softmax_kind="uniform")',
           "brecq quantizes the softmax output on a uniform grid", (PINNED,)),
    Mutant("brecq_no_sign_split", "varq/quant/methods/_framework.py",
           'kind = "sign_split" if site.kind == "ffn_down" else "uniform"', 'kind = "uniform"',
           "brecq's fc2 input uses the plain uniform quantizer", (PINNED,)),
    Mutant("brecq_no_low_bit_groups", "varq/quant/methods/_framework.py",
           "grouped = bits < config.group_below_bits and divisor > 0 and in_features % divisor == 0",
           "grouped = False",
           "brecq never groups weights (g128) or activations (g64) at low bits", (PINNED,)),
    # ---------------------------------------------------------------- LiteVAR
    Mutant("litevar_attn_bits_ignored", "varq/quant/methods/litevar.py",
           "b = config.attn_bits", "b = bits.a_bits",
           "LiteVAR's attention follows the activation bits instead of attn_bits", (PINNED,)),
    Mutant("litevar_skip_single_key_ignored", "varq/quant/methods/litevar.py",
           "exclude=tuple(config.exclude), skip_single_key=True,", "exclude=tuple(config.exclude), skip_single_key=False,",
           "LiteVAR quantizes A and V when a single key exists", (PINNED,)),
    Mutant("litevar_exclude_ignored", "varq/quant/methods/litevar.py",
           "exclude=tuple(config.exclude), skip_single_key=True,", "exclude=(), skip_single_key=True,",
           "LiteVAR quantizes fc2 (exclude ignored)", (PINNED,)),
    # ---------------------------------------------------------------- release-parity fixes reverted
    Mutant("fix_zero_point_clamp", "varq/quant/primitives.py",
           "if clamp_zero_point:", "if False:",
           "the weight zero point is not clamped to [0, 2^b - 1]", (PARITY,)),
    Mutant("fix_step_floor", "varq/quant/methods/_framework.py",
           "weight_min_step: float = 1e-6", "weight_min_step: float = 1e-8",
           "the framework's weight step floor (ours, brecq) is 1e-8 instead of the released 1e-6", (PARITY,)),
    Mutant("fix_step_floor_ignored", "varq/quant/quantizer.py",
           "eps=spec.min_step", "eps=EPS",
           "the quantizer ignores the spec's step floor", (PARITY,)),
    Mutant("fix_beta_counter", "varq/quant/recon/adaround.py",
           "cfg.beta(it + 1)", "cfg.beta(it)",
           "the β schedule counts iterations from 0 (one step behind the release)", (PARITY,)),
    Mutant("fix_budget_override", "varq/compose.py",
           "if key in node and node[key] is None:",
           "if key in node and (node[key] is None or node[key] in (5000, 1e-4)):",
           "an explicit quant.iters / quant.lr equal to the method default is replaced by the model budget",
           (PARITY,)),
    Mutant("fix_class_draw", "varq/calib/resample.py",
           "return torch.from_numpy(np.random.RandomState(seed).choice(num_classes, k, replace=False)).long()",
           "return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:k]",
           "the released (numpy choice) class draw is replaced by torch's randperm", (PARITY,)),
    Mutant("fix_theta_source_default", "varq/quant/methods/ours.py",
           'theta_source: str = "free_run"', 'theta_source: str = "replay"',
           "θ is searched on teacher-forced calibration rows by default", (PARITY,)),
    Mutant("fix_theta_source_yaml", "varq/conf/quant/ours.yaml",
           "theta_source: free_run ", "theta_source: replay ",
           "quant=ours selects the teacher-forced θ search", (PARITY,)),
    Mutant("fix_ours_litevar_accounting", "varq/quant/methods/ours.py",
           'bitops_fp_layers: str = "as_quantized"', 'bitops_fp_layers: str = "fp16"',
           "an FP Linear counts at 16×16 bits in the BitOPs total by default", (PARITY,)),
    Mutant("fix_brecq_calib", "varq/conf/quant/brecq.yaml",
           "override /calib@_global_.calib: distinct", "override /calib@_global_.calib: random",
           "brecq calibrates on random generations instead of ours' generated set", (PARITY,)),
    # ---------------------------------------------------------------- PTQ4ARVG and SmoothQuant
    Mutant("ptq_shift_half_step", "varq/quant/transforms.py",
           "return delta_C * (2 ** (bits - 1) - 1 - zero_C)", "return delta_C * (2 ** (bits - 1) - 0.5 - zero_C)",
           "the symmetric shift is off by half a quantization step", (PTQ, TRANSFORMS)),
    Mutant("ptq_dgc_no_tie_fallback", "varq/calib/dgc.py",
           "if dist_cond_N.shape == dist_uncond_N.shape and torch.allclose(dist_cond_N, dist_uncond_N, atol=atol):",
           "if False:",
           "DGC ranks tied distances (C ≥ N) instead of falling back to the released 0.5 ratio", (DGC,)),
    Mutant("ptq_gps_percentile_ranges", "varq/quant/transforms.py",
           "range_C = x.amax(dim=0) - x.amin(dim=0)",
           "range_C = torch.quantile(x, 0.99, dim=0) - torch.quantile(x, 0.01, dim=0)",
           "per-batch GPS takes percentile channel ranges instead of the batch's min/max", (PTQ, TRANSFORMS)),
    Mutant("fix_ptq_masked_default", "varq/conf/quant/ptq4arvg.yaml",
           "masked_calibration: false   # true: calibrate on the block-causal (masked) pass instead",
           "masked_calibration: true   # true: calibrate on the block-causal (masked) pass instead",
           "PTQ4ARVG calibrates on the masked pass by default", (PTQ,)),
    Mutant("fix_ptq_statistics_default", "varq/conf/quant/ptq4arvg.yaml",
           "statistics: released        # fp: FP observation, EMA of ranges, running abs-max, GPS",
           "statistics: fp        # fp: FP observation, EMA of ranges, running abs-max, GPS",
           "PTQ4ARVG gathers FP statistics by default instead of the released ones", (PTQ,)),
    Mutant("fix_dgc_selection_default", "varq/conf/calib/dgc.yaml",
           "selection: ratio      #", "selection: distance      #",
           "DGC keeps the top-ranked sequences by default instead of the released cond/uncond ratio", (PTQ, DGC)),
    Mutant("fix_smoothquant_calib", "varq/conf/quant/smoothquant.yaml",
           "masked_calibration: false   # true: calibrate on the block-causal (masked) pass\n",
           "masked_calibration: true   # true: calibrate on the block-causal (masked) pass\n",
           "the smoothquant baseline calibrates on other data than ptq4arvg (masked pass)", (PTQ,)),
    Mutant("ptq_fp_observation", "varq/quant/methods/_static_recipe.py",
           "observe_static_quantizers(var, batches, masked=recipe.masked, quantized=recipe.released)",
           "observe_static_quantizers(var, batches, masked=recipe.masked, quantized=False)",
           "released statistics observe on FP activations instead of with the upstream quantizers on", (PTQ,)),
    Mutant("ptq_integer_zero_points", "varq/quant/methods/_static_recipe.py",
           "ema_qparams=self.released and not weight)", "ema_qparams=False)",
           "activation quantizers keep an EMA of ranges (integer zero points) instead of step and zero point", (PTQ,)),
    Mutant("ptq_scales_running_max", "varq/quant/methods/_static_recipe.py",
           "return new if old is None else (1 - m) * old + m * new",
           "return new if old is None else torch.maximum(old, new)",
           "SmoothQuant/GPS scales are a running max over batches instead of an EMA", (PTQ,)),
    Mutant("ptq_search_fractional_zero_point", "varq/quant/quantizer.py",
           "range_percentile(x_view, layout, self._score_quant,", "range_percentile(x_view, layout, self._fake_quant,",
           "percentile candidates are scored with fractional zero points (the release scores integer ones)",
           (PTQ, "tests/quant/test_quantizer.py")),
    Mutant("ptq_head_sink_split", "varq/quant/methods/_static_recipe.py",
           'SINK_SPLIT_KINDS = ("attn_out", "ffn_down")',
           'SINK_SPLIT_KINDS = ("attn_out", "ffn_down", "head")',
           "the head is sink-split, which the release never does", (PTQ,)),
    Mutant("dgc_rows_not_interleaved", "varq/calib/dgc.py",
           "keys.sort()", "keys.sort(key=lambda k: (k[1], k[2]))",
           "DGC lays rows out all-cond then all-uncond instead of batch by batch", (DGC,)),
    Mutant("dgc_set_size", "varq/conf/calib/dgc.yaml", "n_images: 128", "n_images: 64",
           "the DGC preset keeps 64 sequences instead of the released 128", (PTQ, DGC)),
    # ---------------------------------------------------------------- fast paths and the fp8 backend
    Mutant("fast_sign_split_steps_swapped", "varq/quant/primitives.py",
           "torch.lerp(step_pos, step_neg,", "torch.lerp(step_neg, step_pos,",
           "sign-split's inference path gives negatives the positive step and vice versa", (FAST,)),
    Mutant("fast_log2_row_max_no_clamp", "varq/quant/primitives.py",
           "if row_max is not None:  # with s the row's own max", "if False:  # with s the row's own max",
           "the log2 inference path skips the upper clamp although the given row max is below |x|", (FAST,)),
    Mutant("fast_log2_quantizer_loses_sign", "varq/quant/quantizer.py",
           "out = fake_quantize_log2(x_in, self.spec.bits)", "out = fake_quantize_log2(x_in.abs(), self.spec.bits)",
           "the dynamic per-row log2 quantizer's fast path drops the sign of its input", (FAST,)),
    Mutant("fast_softmax_wrong_dim", "varq/quant/attention.py",
           "torch._softmax(logits, -1, False, out=logits)", "torch._softmax(logits, -2, False, out=logits)",
           "the in-place softmax of the explicit attention normalises over queries", (FAST,)),
    Mutant("ffn_inplace_exact_gelu", "varq/models/var_blocks.py",
           "gelu_(h_BLD, approximate=self.act.approximate)", "gelu_(h_BLD)",
           "the FFN's in-place GELU at inference is the exact one, not VAR's tanh approximation",
           ("tests/models/test_var.py",)),
    Mutant("fp8_no_zero_point_term", "varq/quant/fp8.py",
           " - zero_M1 * self.weight_code_sum_1N", "",
           "backend=fp8 W4A4 drops the activation zero point's term z·Σc_w", ("tests/quant/test_fp8.py",)),
    Mutant("recon_scoring_counted_as_capture", "varq/quant/recon/engine.py",
           '"capture_s": total_s - fit_s - score_s', '"capture_s": total_s - fit_s',
           "reconstruction counts the unit scoring twice (in capture and in scoring)", ("tests/quant/test_brecq.py",)),
    # ---------------------------------------------------------------- vectorised attention pass of reconstruction
    Mutant("prefix_ranges_not_cumulative", "varq/quant/prefix_attention.py",
           "lo, hi = torch.cummin(lo, dim=_KEY_AXIS).values, torch.cummax(hi, dim=_KEY_AXIS).values",
           "lo, hi = lo.amin(dim=_KEY_AXIS, keepdim=True).expand_as(lo), hi.amax(dim=_KEY_AXIS, keepdim=True).expand_as(hi)",
           "the vectorised pass quantizes K/V with the whole sequence's range instead of each scale's prefix",
           ("tests/quant/test_prefix_attention.py",)),
    Mutant("prefix_importance_plain_mean", "varq/quant/shift_sum.py",
           "importance_BHT = attn_BHLT.float().sum(dim=2) / layout.rows_T",
           "importance_BHT = attn_BHLT.float().mean(dim=2)",
           "the vectorised shift-and-sum importance averages over every query row, not the block's scale",
           ("tests/quant/test_prefix_attention.py",)),
    Mutant("fused_quantizers_with_gradients", "varq/quant/fused.py",
           "and not torch.is_grad_enabled() and x.ndim >= 1", "and x.ndim >= 1",
           "the compiled quantizers also serve calls that need the straight-through graph (calibration)",
           ("tests/quant/test_fused_quantizers.py",)),
    # ---------------------------------------------------------------- autocast dtype flow of the official code
    Mutant("autocast_qkv_bias_promotes", "varq/models/var_blocks.py",
           "torch.is_autocast_enabled(x.device.type)", "False",
           "under autocast the fp32 bias is added to the bf16 qkv GEMM (Q/K/V promoted to fp32)", (AUTOCAST,)),
    Mutant("autocast_attn_branch_unrounded", "varq/models/var_blocks.py",
           "scaled_BLC = scaled_BLC.to(out_BLC.dtype)", "pass",
           "the attention branch's γ1 product is not rounded to the projection's dtype", (AUTOCAST,)),
    Mutant("autocast_weight_cast_kept_forever", "varq/quant/qmodules.py",
           "if held is not None and held[0] is weight and", "if held is not None and",
           "a fake-quantized Linear keeps its autocast copy of Ŵ after Ŵ was recomputed",
           ("tests/quant/test_autocast_weight.py",)),
    Mutant("fast_affine_divides_the_callers_tensor", "varq/quant/primitives.py",
           "scaled = x32.div_(scale) if x32 is not x else x32 / scale", "scaled = x32.div_(scale)",
           "the affine fast path divides an fp32 input in place (the caller's activation is overwritten)", (FAST,)),
    Mutant("fast_log2_sign_from_abs", "varq/quant/primitives.py",
           "return q.copysign_(x).to(x.dtype)", "return q.copysign_(x.float().abs()).to(x.dtype)",
           "the log2 fast path takes its signs from |x| (negative inputs come back positive)", (FAST,)),
    Mutant("autocast_resnet_sum_in_bf16", "varq/models/vae_blocks.py",
           "if torch.result_type(h_BChw, shortcut_BChw) != h_BChw.dtype:", "if False:",
           "the VQ-VAE residual sum is written into conv2's bf16 output under autocast", (AUTOCAST,)),
    # ---------------------------------------------------------------- eval.decoder=fast
    Mutant("fast_decoder_phase1_taps", "varq/models/fast_decoder.py",
           "torch.stack((w0 + w1, w2), dim)", "torch.stack((w0, w1 + w2), dim)",
           "phase 1 of the upsample conv reads its rows with phase 0's taps", (FAST_DECODER,)),
    Mutant("fast_decoder_phase_offset", "varq/models/fast_decoder.py",
           "y_BhwP[:, a:a + h, b:b + w, p * O:(p + 1) * O]", "y_BhwP[:, :h, :w, p * O:(p + 1) * O]",
           "every phase is read at offset (0, 0) of the padded-input conv", (FAST_DECODER,)),
    Mutant("fast_decoder_stale_kernels", "varq/models/fast_decoder.py",
           "if key != self._key or self._kernels is None:", "if self._kernels is None:",
           "the phase kernels of the first weights are kept after new weights are loaded", (FAST_DECODER,)),
    Mutant("fast_decoder_not_wired", "varq/sample/generate.py",
           "with decoder_mode(vqvae, cfg.decoder):", "with decoder_mode(vqvae, \"reference\"):",
           "generation ignores eval.decoder", (FAST_DECODER,)),
    # ---------------------------------------------------------------- eval.decoder=winograd
    Mutant("winograd_cofactor_sign", "varq/models/winograd.py",
           "out[i] -= c * root", "out[i] += c * root",
           "Bᵀ built from Π(x + p) instead of Π(x - p)", (WINOGRAD,)),
    Mutant("winograd_band_overlap", "varq/models/winograd.py",
           "band = x_BHWC[b0:b1, m * t0:m * t1 + r - 1]", "band = x_BHWC[b0:b1, m * t0:m * t1 + r - 2]",
           "a band misses the last input row its tiles overlap into", (WINOGRAD,)),
    Mutant("winograd_stale_transforms", "varq/models/winograd.py",
           "if key != self._key or self._transforms is None:", "if self._transforms is None:",
           "U of the first weights is kept after new weights are loaded", (WINOGRAD,)),
    Mutant("winograd_under_autocast", "varq/models/winograd.py",
           'and not torch.is_autocast_enabled("cpu") and', "and",
           "the fp32 transforms run on autocast's bf16 GEMMs", (WINOGRAD,)),
    # ---------------------------------------------------------------- reuse_freed_memory
    Mutant("reuse_freed_memory_on_cuda_too", "varq/sample/cpu_memory.py",
           'if not enabled or device_type != "cpu":', "if not enabled:",
           "a CUDA run switches glibc's allocator too", ("tests/sample/test_cpu_memory.py",)),
    Mutant("reuse_freed_memory_not_wired", "varq/run.py",
           "reuse_for_run(run_cfg.reuse_freed_memory,", "reuse_for_run(False,",
           "the command-line run ignores reuse_freed_memory", ("tests/sample/test_cpu_memory.py",)),
]


def _copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


def _check(mutant: Mutant) -> None:
    text = (ROOT / mutant.path).read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name}: its original text occurs {count} times in {mutant.path} (expected exactly once); "
            f"update scripts/mutants.py"
        )


def _pytest(tree: Path, tests: tuple[str, ...] | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(tests or ())]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)


def _run(mutant: Mutant | None, tests: tuple[str, ...] | None) -> tuple[bool, float, str]:
    """(pytest passed, seconds, last output line) on a scratch copy with ``mutant`` applied (None: unmutated)."""
    with tempfile.TemporaryDirectory(prefix="varq-mutant-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        if mutant is not None:
            target = tree / mutant.path
            target.write_text(target.read_text().replace(mutant.original, mutant.replacement, 1))
        t0 = time.perf_counter()
        proc = _pytest(tree, tests)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return proc.returncode == 0, time.perf_counter() - t0, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutant (repeat)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--full", action="store_true", help="run the whole fast suite for every mutant")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("mutant names must be unique")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.path}: {m.description}")
        return 0
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        print(f"unknown mutant(s) {unknown}; see --list", file=sys.stderr)
        return 2
    selected = [m for m in MUTANTS if not args.only or m.name in args.only]
    for m in selected:
        _check(m)

    files = None if args.full else tuple(sorted({t for m in selected for t in m.tests}))
    ok, seconds, last = _run(None, files)
    print(f"baseline ({'whole fast suite' if files is None else ' '.join(files)}): {last} [{seconds:.0f} s]")
    if not ok:
        print("the unmutated tree fails its tests: fix that first", file=sys.stderr)
        return 2

    survived = []
    for m in selected:
        passed, seconds, last = _run(m, None if args.full else m.tests)
        status = "SURVIVED" if passed else "killed"
        print(f"{status:8s} {m.name:34s} {seconds:5.0f} s  {m.description}")
        if passed:
            survived.append(m.name)
    print(f"{len(selected) - len(survived)}/{len(selected)} mutants killed"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
