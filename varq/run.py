"""Entry point: ``varq-run`` / ``python -m varq.run [group=option ...]`` (Hydra; ``-m`` for sweeps).

compose → typed config → pipeline.run → a small summary (the row), printed as a table → the tracker (W&B).
With ``+shard=k`` (and ``eval.num_shards=N``) it only generates shard k of the run's samples and exits
(see varq.scaleout); a later run without ``shard`` merges.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, open_dict

from varq.compose import to_run_config
from varq.config import ConfigError
from varq.models.checkpoint import CheckpointError
from varq.rows import SUMMARY_METRICS
from varq.validate import validate_run

log = logging.getLogger("varq")

SUMMARY_COLUMNS = ("model", "task", "quant", "bits", "calib", "n_samples", *SUMMARY_METRICS)


def format_rows(rows: list[dict]) -> str:
    def cell(v):
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [SUMMARY_COLUMNS] + [tuple(cell(r.get(c)) for c in SUMMARY_COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pop_shard(cfg: DictConfig):
    # `shard` selects what this invocation does, it is not part of the run's configuration
    with open_dict(cfg):
        return cfg.pop("shard", None)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from varq import pipeline
    from varq.sample.cpu_memory import reuse_for_run
    from varq.tracking import Tracker, run_tracked, track_result

    try:
        shard = _pop_shard(cfg)
        run_cfg = to_run_config(cfg)
        validate_run(run_cfg)  # also done before Hydra's folder exists (callback); here for Python-API callers
        reuse_for_run(run_cfg.reuse_freed_memory, pipeline.resolve_device(run_cfg.device).type)
        tracker = Tracker(run_cfg.logger)
        if shard is not None:
            from varq.scaleout import generate_shard

            made = generate_shard(run_cfg, shard)
            samples_dir = pipeline.run_paths(run_cfg).samples_dir
            print(f"shard {shard}/{run_cfg.eval.num_shards}: {made} batches generated in {samples_dir}")
            return {"shard": shard, "batches_made": made}
        result = run_tracked(tracker, run_cfg, pipeline.run)  # W&B open from the start, fed by progress
    except (ConfigError, CheckpointError) as err:
        # a configuration mistake: one clear line, no traceback, non-zero exit
        print(f"varq: error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = ([result.reference.row] if result.reference is not None else []) + [result.row]
    print(format_rows(rows))
    print(f"run dir: {result.paths.run_dir}")
    track_result(tracker, run_cfg, result)  # after the row is on disk; W&B failures only warn
    return result.row


def cli() -> None:
    """Console script ``varq-run`` (= ``python -m varq.run``). ``--cfg job`` shows the validated configuration,
    i.e. what runs (varq.showcfg); everything else goes to Hydra."""
    from varq.showcfg import show_effective_config

    if not show_effective_config(sys.argv[1:]):
        main()


if __name__ == "__main__":
    cli()
