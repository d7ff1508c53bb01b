#!/usr/bin/env bash
# Shift-and-Sum's main table on a SLURM cluster: VAR d16/d20/d24/d30 × W6A6/W4A8/W4A6/W4A4 × brecq, litevar, ours,
# ours_litevar, 50k samples per class-conditional ImageNet-256 run (eval=fid50k), plus each depth's FP16 row.
#
#   PARTITION=gpu ACCOUNT=myproj DATA=/data/var bash sweeps/table1_slurm.sh [refs|grid|all] [hydra overrides...]
#
# Run it from the repository root on a login node, inside tmux/screen: each stage is a Hydra multirun whose
# submitit launcher submits one job array and waits for it (the waiting process uses no GPU).
#
# Stages
#   refs  the four FP16 references, each fanned out over $SHARDS GPUs (+shard=k: one array task per shard), then
#         merged (metrics + row, one small job per depth). Done first so that the 64 grid tasks find them on disk:
#         otherwise the first grid task of each depth would generate 50k FP16 samples while its 15 siblings wait on
#         the reference lock holding GPUs.
#   grid  the 64 quantized runs, one array task (one GPU) each; each computes FID against ImageNet and FID2FP16
#         against the shared reference.
#   all   refs, then grid (default).
#
# Safe to re-run at any point: finished runs are skipped (row.json), partial ones resume (complete sample shards,
# saved quantizer state), and a task that hits its time limit is requeued by submitit (max_num_timeout in
# varq/conf/hydra/launcher/slurm.yaml) and continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
STAGE="${1:-all}"; shift || true

PARTITION="${PARTITION:?set PARTITION to the GPU partition}"
ACCOUNT="${ACCOUNT:-null}"                      # null: your default account
DATA="${DATA:?set DATA to the folder with var_d*.pth, vae_ch160v4096z32.pth, the ADM npz, the FID Inception weights}"
ROOT="${VARQ_ROOT:-runs}"                       # on a file system every node sees
SHARDS="${SHARDS:-8}"                           # GPUs per FP16 reference
MODELS=var_d16,var_d20,var_d24,var_d30
BITS=w6a6,w4a8,w4a6,w4a4
QUANTS=brecq,litevar,ours,ours_litevar

common=(
  hydra/launcher=slurm
  hydra.launcher.partition="$PARTITION" hydra.launcher.account="$ACCOUNT"
  hydra.launcher.gpus_per_node=1 hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=64
  eval=fid50k model.ckpt_dir="$DATA"
  eval.reference_npz="$DATA/VIRTUAL_imagenet256_labeled.npz" eval.inception_weights="$DATA/weights-inception-2015-12-05-6726825d.pth"
  paths.root="$ROOT" paths.cache="$ROOT/cache"
)
shard_list="$(seq -s, 0 $((SHARDS - 1)))"

refs() {
  # 4 depths × $SHARDS shards of generation only (no metrics); ~1 h per shard-task at d30 with 8 shards
  "$PY" -m varq.run -m "${common[@]}" quant=fp16 model="$MODELS" eval.num_shards="$SHARDS" +shard="$shard_list" \
    hydra.launcher.timeout_min=180 hydra.sweep.dir="$ROOT/hydra/table1/refs-shards" "$@"
  # merge: samples are complete, so each job only computes metrics and writes the FP16 row
  "$PY" -m varq.run -m "${common[@]}" quant=fp16 model="$MODELS" eval.num_shards="$SHARDS" \
    hydra.launcher.timeout_min=60 hydra.sweep.dir="$ROOT/hydra/table1/refs-merge" "$@"
}

grid() {
  # at most 16 GPUs at once (array_parallelism); calibration + 50k samples + metrics fit in 4 h per task
  "$PY" -m varq.run -m "${common[@]}" model="$MODELS" bits="$BITS" quant="$QUANTS" \
    hydra.launcher.timeout_min=240 hydra.launcher.array_parallelism=16 hydra.sweep.dir="$ROOT/hydra/table1/grid" "$@"
}

case "$STAGE" in
  refs) refs "$@" ;;
  grid) grid "$@" ;;
  all) refs "$@"; grid "$@" ;;
  *) echo "usage: $0 [refs|grid|all] [hydra overrides...]" >&2; exit 2 ;;
esac
# then: $PY -m varq.tables --root "$ROOT" --out results/tables
