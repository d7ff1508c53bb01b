#!/usr/bin/env bash
# The GPU benchmark of `varq.bench` in one command, meant to finish within about 10 minutes on one H100/H200 (an
# estimate from the H100 throughputs in the README: the script has not run on a GPU yet).
#
#   scripts/gpu_bench.sh REFERENCE_REPO [OUT_DIR]
#
# REFERENCE_REPO is a checkout of github.com/FoundationVision/VAR (the official sampler it is timed against).
# It writes OUT_DIR/bench_gpu.{json,md} (default OUT_DIR: results/bench): FP sampling against the official code at
# d16 and d30 (bf16, batch 64; varq with the reference and the fast decoder, eval.decoder=fast), rtn and ours fake-quantized (eager and compiled quantizers) against FP,
# backend=fp8 (W8A8 and W4A4 rtn) against fake quantization and FP; and OUT_DIR/bench_gpu_calibration.{json,md}: ours' calibration at d16 split into capture,
# scoring and fit, with fp32 and bf16 unit GEMMs and both attention passes (cached, vectorised), projected to the
# paper's 5,000 iterations.
#
# Environment:
#   PYTHON=python3           the interpreter that has CUDA torch
#   WHEELS=dir               install the wheels in dir first, without an index: for a machine that cannot reach
#                            PyPI, download them elsewhere with
#                            `pip download --no-deps -d dir hydra-core==1.3.8 omegaconf==2.3.1 \
#                             antlr4-python3-runtime==4.9.3 torch-fidelity==0.4.0`
#   MODELS, BATCH, DTYPE, REPS, CALIB_ITERS, CALIB_SEQUENCES, EXTRA   override the defaults below
set -euo pipefail

REF=${1:?usage: scripts/gpu_bench.sh REFERENCE_REPO [OUT_DIR]}
OUT=${2:-results/bench}
PY=${PYTHON:-python3}
MODELS=${MODELS:-var_d16 var_d30}
BATCH=${BATCH:-64}
DTYPE=${DTYPE:-bf16}
REPS=${REPS:-3}
CALIB_ITERS=${CALIB_ITERS:-20}
CALIB_SEQUENCES=${CALIB_SEQUENCES:-16}

if [ ! -f "$REF/models/var.py" ]; then
  echo "gpu_bench: $REF has no models/var.py; pass a checkout of github.com/FoundationVision/VAR" >&2
  exit 2
fi
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_bench: torch sees no CUDA device; run `make bench` for the CPU benchmark")
print("gpu_bench:", torch.cuda.get_device_name(), "compute capability", torch.cuda.get_device_capability(),
      "torch", torch.__version__, flush=True)
EOF
# Sampling, fake quantization, fp8 and metrics for every model; calibration (the paper's target is d16) apart, into
# its own file, so a stopped run keeps what the first part measured.
# shellcheck disable=SC2086  # MODELS and EXTRA are word lists
PYTHONUNBUFFERED=1 "$PY" -m varq.bench --device cuda --reference-repo "$REF" --models $MODELS \
  --batch-size "$BATCH" --dtypes "$DTYPE" --reps "$REPS" --skip calibration --fused-quantizers \
  --out "$OUT" --name bench_gpu ${EXTRA:-}
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 "$PY" -m varq.bench --device cuda --models var_d16 --skip sampling fake_quant fp8 metrics \
  --calib-iters "$CALIB_ITERS" --calib-sequences "$CALIB_SEQUENCES" --calib-gemm-precision fp32 bf16 \
  --calib-attention-pass cached vectorised --out "$OUT" --name bench_gpu_calibration ${EXTRA:-}
