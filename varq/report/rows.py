"""Result rows (one ``row.json`` per run) → a clean pandas DataFrame.

Rows are written by other parts of varq; this module only reads them, tolerating unknown extra keys and
skipping (with a warning) files that cannot be a row, so one broken run never hides the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from varq.report.vocab import FP_BITS

log = logging.getLogger(__name__)

ROW_FILE = "row.json"
KEY_COLUMNS: tuple[str, ...] = ("model", "quant", "bits", "calib", "task")
METRIC_COLUMNS: tuple[str, ...] = ("inception_score", "fid", "fid2fp16", "class_accuracy")
TIME_COLUMNS: tuple[str, ...] = ("time_build_s", "time_calibrate_s", "time_generate_s", "time_metrics_s")
PATH_COLUMN = "row_path"


def load_rows(roots: Iterable[Path]) -> pd.DataFrame:
    """Read every ``row.json`` below the given roots (missing roots are skipped).

    Adds ``row_path`` (the file) so that artifacts next to a row, e.g. ``grid.png``, can be found later.
    """
    records: list[dict] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(ROW_FILE)):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                log.warning("skipping unreadable %s: %s", path, err)
                continue
            if not isinstance(record, dict) or not record.get("run_id"):
                log.warning("skipping %s: not a JSON object with a run_id", path)
                continue
            missing = [key for key in KEY_COLUMNS if key not in record]
            if missing:
                log.warning("skipping %s: missing keys %s", path, missing)
                continue
            records.append({**record, PATH_COLUMN: str(path)})
    frame = pd.DataFrame.from_records(records)
    # Guarantee the contract columns so that downstream code never branches on their presence.
    for column in (*KEY_COLUMNS, "run_id", "n_samples", "seed", "created_at", *METRIC_COLUMNS, *TIME_COLUMNS, PATH_COLUMN):
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    return _normalise(frame)


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric metrics (JSON null → NaN), parsed timestamps, and one spelling of the FP reference row."""
    numeric = [c for c in (*METRIC_COLUMNS, *TIME_COLUMNS, "n_samples", "seed") if c in frame.columns]
    is_fp = frame["quant"].eq("fp16") | frame["bits"].eq(FP_BITS)
    return frame.assign(
        **{c: pd.to_numeric(frame[c], errors="coerce") for c in numeric},
        created_at=pd.to_datetime(frame["created_at"], utc=True, errors="coerce", format="ISO8601"),
        # The FP row has no bit-width and no calibration; some writers may spell those differently.
        quant=frame["quant"].where(~is_fp, "fp16"),
        bits=frame["bits"].where(~is_fp, FP_BITS),
        calib=frame["calib"].where(~is_fp, "none").fillna("none"),
    )


def dedupe_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one row per ``run_id``: the newest ``created_at`` (a re-run or resumed job overwrites older results).

    Rows without a timestamp count as oldest; ties keep the later path so the result is deterministic.
    """
    ordered = frame.sort_values(["created_at", PATH_COLUMN], na_position="first", kind="stable")
    return ordered.drop_duplicates("run_id", keep="last").sort_index().reset_index(drop=True)


def select(
    frame: pd.DataFrame,
    *,
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    bits: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Filter by the CLI selections. The FP16 row survives method/bit filters: every delta needs it."""
    mask = pd.Series(True, index=frame.index)
    if models:
        mask &= frame["model"].isin(models)
    if tasks:
        mask &= frame["task"].isin(tasks)
    is_fp = frame["bits"].eq(FP_BITS)
    if methods:
        mask &= frame["quant"].isin(methods) | is_fp
    if bits:
        mask &= frame["bits"].isin(bits) | is_fp
    return frame.loc[mask].reset_index(drop=True)


def collapse_repeats(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per table cell key (task, model, bits, quant, calib).

    Several runs can share a key (different seeds, or a smoke run next to the full protocol). The run(s)
    with the most samples win, because a 100-sample FID is not comparable to a 50k one; among those the
    metrics are averaged over seeds, and ``n_runs`` records how many were averaged.
    """
    keys = list(KEY_COLUMNS)
    if frame.empty:
        return frame.assign(n_runs=pd.Series(dtype="int64"))
    n_samples = frame["n_samples"].fillna(0)
    largest = n_samples.eq(n_samples.groupby([frame[k] for k in keys], dropna=False).transform("max"))
    kept = frame.loc[largest]
    numeric = [c for c in (*METRIC_COLUMNS, *TIME_COLUMNS, "n_samples") if c in kept.columns]
    grouped = kept.groupby(keys, dropna=False, sort=False)
    collapsed = grouped[numeric].mean()
    collapsed["n_runs"] = grouped.size()
    collapsed["run_ids"] = grouped["run_id"].agg(lambda ids: ",".join(sorted(ids)))
    collapsed[PATH_COLUMN] = grouped[PATH_COLUMN].agg(lambda paths: sorted(paths)[-1])
    return collapsed.reset_index()


def method_labels(frame: pd.DataFrame) -> pd.Series:
    """Display name of each row's method: the quant key, plus the calibration set when one task has the same
    method with several calibration sets (``ours (random)`` next to ``ours (resample)``)."""
    n_calib = frame.groupby(["task", "quant"])["calib"].transform("nunique")
    with_calib = frame["quant"] + " (" + frame["calib"].astype(str) + ")"
    return frame["quant"].where(n_calib.le(1), with_calib)
