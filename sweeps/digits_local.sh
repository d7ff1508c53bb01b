#!/usr/bin/env bash
# The digits grid (every registered method × every bit-width on the embedded var_digits model) on this machine,
# then the comparison tables. CPU is fine: var_digits is small.
#
#   bash sweeps/digits_local.sh                     # results under runs/, tables under results/tables
#   bash sweeps/digits_local.sh logger=wandb        # extra Hydra overrides go to every run (here: W&B, offline)
#
# Hydra's default (basic) launcher runs the points one after another in this process; hydra/launcher=local would
# start every point at once as a subprocess, too many for a laptop. Re-running skips every finished run (each
# run directory is keyed by its config hash and holds row.json when done), so an interrupted grid just continues.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
ROOT="${VARQ_ROOT:-runs}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# only methods that are registered in this checkout (fp16 is the shared reference, produced on demand)
QUANTS="$("$PY" -c 'from varq.quant.registry import available_methods as m; print(",".join(x for x in m() if x != "fp16"))')"
BITS=w8a8,w6a6,w4a8,w4a6,w4a4

"$PY" -m varq.run -m model=var_digits eval=digits quant="$QUANTS" bits="$BITS" \
  paths.root="$ROOT" paths.cache="$ROOT/cache" hydra.sweep.dir="$ROOT/hydra/digits" "$@"
"$PY" -m varq.tables --root "$ROOT" --out results/tables
