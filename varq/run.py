"""Entry point: ``python -m varq.run [group=option ...]`` (Hydra; ``-m`` for sweeps).

compose → typed config → pipeline.run → a small summary (the row), printed as a table.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from varq.config import ConfigError, to_run_config
from varq.models.checkpoint import CheckpointError

log = logging.getLogger("varq")

SUMMARY_COLUMNS = ("model", "quant", "bits", "calib", "n_samples", "inception_score", "fid", "fid2fp16", "class_accuracy")


def format_rows(rows: list[dict]) -> str:
    def cell(v):
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [SUMMARY_COLUMNS] + [tuple(cell(r.get(c)) for c in SUMMARY_COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from varq import pipeline

    try:
        run_cfg = to_run_config(cfg)
        result = pipeline.run(run_cfg)
    except (ConfigError, CheckpointError) as err:
        # a configuration mistake: one clear line, no traceback, non-zero exit
        print(f"varq: error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = ([result.reference.row] if result.reference is not None else []) + [result.row]
    print(format_rows(rows))
    print(f"run dir: {result.paths.run_dir}")
    return result.row


if __name__ == "__main__":
    main()
