"""Result rows (one ``row.json`` per run) → a clean pandas DataFrame, and seed repeats → table cells.

Rows are written by the pipeline through the schema of ``varq.rows``; this module only reads them (as rows of any
varq version: unknown extra keys tolerated, later columns optional), skipping with a warning naming the file
anything that cannot be a row — binary, truncated, not an object, a column of the wrong type, a bit-width label that
contradicts its numbers — so one broken run never hides the others.

Identity columns (``protocol_id``, ``quant_id``, ``calib_id``, ``calib_seed``) come from the row when it has them.
Older rows lack them: the protocol is then derived from what they do carry (model identity, task, eval protocol,
sample count, cfg, top-k/top-p, dtype) under a ``legacy:`` prefix, and an unknown quant/calib identity is its own
value (``unknown``), so a derived or missing identity is never merged with a recorded one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from varq.config import DEFAULT_BACKEND  # also what a row without a backend column ran on (written before it existed)
from varq.report.stats import summarize
from varq.report.vocab import FP_BITS
from varq.rows import KEY_COLUMNS, RESULT_ROW, SUMMARY_METRICS, TIME_COLUMNS

log = logging.getLogger(__name__)

ROW_FILE = "row.json"
METRIC_COLUMNS: tuple[str, ...] = SUMMARY_METRICS  # the metric columns every frame has (others when rows have them)
IDENTITY_COLUMNS: tuple[str, ...] = RESULT_ROW.names("identity")
# A table cell: runs that differ only in calib_seed and/or the eval seed.
CELL_COLUMNS: tuple[str, ...] = ("protocol_id", "task", "model", "quant", "quant_id", "bits", "calib", "calib_id",
                                  "backend")
# What an old row without protocol_id still says about its protocol (the eval seed deliberately excluded).
LEGACY_PROTOCOL_FIELDS: tuple[str, ...] = (
    "model", "model_id", "task", "eval", "n_samples", "cfg", "top_k", "top_p", "more_smooth", "dtype",
)
UNKNOWN = "unknown"
PATH_COLUMN = "row_path"
SPREAD_SUFFIXES: tuple[str, ...] = ("_std", "_ci_low", "_ci_high", "_runs")


def _read_record(path: Path) -> dict | None:
    """The row as a dict, or None after a warning naming the file and what is wrong with it."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        log.warning("skipping unreadable %s (%s: %s); rerun that run or delete the file", path,
                    type(err).__name__, str(err)[:120])
        return None
    if not isinstance(record, dict) or not record.get("run_id"):
        log.warning("skipping %s: not a JSON object with a run_id", path)
        return None
    problems = RESULT_ROW.problems(record, complete=False)
    if problems:
        log.warning("skipping %s: %s", path, "; ".join(problems))
        return None
    mismatch = bits_mismatch(record)
    if mismatch:
        log.warning("refusing %s: %s", path, mismatch)
        return None
    return record


def _as_int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number == int(number) else None


def bits_mismatch(record: dict) -> str | None:
    """Why the row's ``bits`` label contradicts its ``w_bits``/``a_bits`` (None when consistent or not recorded).

    Rows written before the numbers were recorded cannot be checked and pass; a row that records them must agree.
    """
    if "w_bits" not in record and "a_bits" not in record:
        return None
    w, a = record.get("w_bits"), record.get("a_bits")
    if a is None and (w is None or _as_int(w) == 16):
        expected = FP_BITS  # the FP reference: no activation bits (weights null or 16)
    else:
        w_int, a_int = _as_int(w), _as_int(a)
        if w_int is None or a_int is None:
            return f"w_bits={w!r} a_bits={a!r} are not both integers (or both null for fp16)"
        expected = f"w{w_int}a{a_int}"
    label = record.get("bits")
    if label != expected:
        return f"bits label {label!r} disagrees with w_bits={w} a_bits={a} (expected {expected!r})"
    return None


def load_rows(roots: Iterable[Path]) -> pd.DataFrame:
    """Read every ``row.json`` below the given roots (missing roots are skipped).

    Adds ``row_path`` (the file) so that artifacts next to a row, e.g. ``grid.png``, can be found later.
    """
    records: list[dict] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(ROW_FILE)):
            record = _read_record(path)
            if record is not None:
                records.append({**record, PATH_COLUMN: str(path)})
    frame = pd.DataFrame.from_records(records)
    # Guarantee the contract columns so that downstream code never branches on their presence.
    for column in (*KEY_COLUMNS, "run_id", "n_samples", "seed", "created_at", *METRIC_COLUMNS, *TIME_COLUMNS,
                   *IDENTITY_COLUMNS, *LEGACY_PROTOCOL_FIELDS, PATH_COLUMN):
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    return _identify(_normalise(frame))


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric metrics (JSON null → NaN), parsed timestamps, and one spelling of the FP reference row."""
    numeric = [c for c in (*METRIC_COLUMNS, *TIME_COLUMNS, "n_samples", "seed", "calib_seed") if c in frame.columns]
    is_fp = frame["quant"].eq("fp16") | frame["bits"].eq(FP_BITS)
    return frame.assign(
        **{c: pd.to_numeric(frame[c], errors="coerce") for c in numeric},
        created_at=pd.to_datetime(frame["created_at"], utc=True, errors="coerce", format="ISO8601"),
        # The FP row has no bit-width and no calibration; some writers may spell those differently.
        quant=frame["quant"].where(~is_fp, "fp16"),
        bits=frame["bits"].where(~is_fp, FP_BITS),
        calib=frame["calib"].where(~is_fp, "none").fillna("none"),
        backend=frame["backend"].fillna(DEFAULT_BACKEND).astype(str),
    )


def _text(value: object) -> str:
    """A stable spelling of one field for hashing; absent/NaN is its own token."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<missing>"
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


def legacy_protocol_id(row: pd.Series) -> str:
    payload = json.dumps({field: _text(row.get(field)) for field in LEGACY_PROTOCOL_FIELDS}, sort_keys=True)
    return "legacy:" + hashlib.sha256(payload.encode()).hexdigest()[:10]


def _identify(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the identity columns: recorded values as strings, derived or ``unknown`` ones otherwise."""
    if frame.empty:
        return frame
    recorded = frame["protocol_id"].notna()
    protocol = frame["protocol_id"].astype("object").where(recorded, frame.apply(legacy_protocol_id, axis=1))
    is_fp = frame["quant"].eq("fp16")
    no_calib = frame["calib"].eq("none")
    return frame.assign(
        protocol_id=protocol.astype(str),
        quant_id=frame["quant_id"].astype("object").where(frame["quant_id"].notna(), UNKNOWN).astype(str),
        calib_id=frame["calib_id"].astype("object").where(
            frame["calib_id"].notna(), pd.Series("none", index=frame.index).where(no_calib | is_fp, UNKNOWN)).astype(str),
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
    protocols: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Filter by the CLI selections, logging how many rows each filter dropped. The FP16 row survives
    method/bit filters: every delta needs it. ``protocols`` are prefixes of ``protocol_id``."""
    mask = pd.Series(True, index=frame.index)
    is_fp = frame["bits"].eq(FP_BITS)
    filters = {
        "--models": frame["model"].isin(models) if models else None,
        "--tasks": frame["task"].isin(tasks) if tasks else None,
        "--methods": (frame["quant"].isin(methods) | is_fp) if methods else None,
        "--bits": (frame["bits"].isin(bits) | is_fp) if bits else None,
        "--protocols": frame["protocol_id"].map(lambda p: any(p.startswith(x) for x in protocols)) if protocols else None,
    }
    for flag, keep in filters.items():
        if keep is None:
            continue
        dropped = frame.loc[mask & ~keep]
        if not dropped.empty:
            groups = ", ".join(f"{n} of {m}/{t}" for (m, t), n in dropped.groupby(["model", "task"]).size().items())
            log.warning("%s dropped %d rows (%s)", flag, len(dropped), groups)
        mask &= keep
    return frame.loc[mask].reset_index(drop=True)


def aggregate_cells(frame: pd.DataFrame, metrics: Sequence[str] = METRIC_COLUMNS) -> pd.DataFrame:
    """One row per table cell (:data:`CELL_COLUMNS`): mean of every metric over the cell's runs, plus
    ``<metric>_std``, ``_ci_low``, ``_ci_high`` (95 % bootstrap of the mean) and ``_runs`` (runs with a value);
    ``n_runs`` (runs in the cell), ``n_samples`` (samples per run), the seeds seen and the run ids."""
    keys = list(CELL_COLUMNS)
    present = [m for m in metrics if m in frame.columns]
    spread_columns = [f"{m}{s}" for m in present for s in SPREAD_SUFFIXES]
    if frame.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in (*keys, *present, *spread_columns, "n_runs",
                                                                     "n_samples", "seeds", "calib_seeds", "run_ids",
                                                                     PATH_COLUMN)})
    records: list[dict] = []
    for key, runs in frame.groupby(keys, dropna=False, sort=False):
        record = dict(zip(keys, key))
        for metric in present:
            summary = summarize(runs[metric].to_numpy(dtype="float64"))
            record.update({metric: summary.mean, f"{metric}_std": summary.std, f"{metric}_ci_low": summary.ci_low,
                           f"{metric}_ci_high": summary.ci_high, f"{metric}_runs": summary.n})
        for column in TIME_COLUMNS:
            record[column] = pd.to_numeric(runs[column], errors="coerce").mean()
        record["n_runs"] = len(runs)
        # One protocol has one sample count; a legacy cell whose runs disagree shows the smallest.
        record["n_samples"] = runs["n_samples"].min()
        record["seeds"] = ",".join(_text(s) for s in sorted(runs["seed"].dropna().unique()))
        record["calib_seeds"] = ",".join(_text(s) for s in sorted(runs["calib_seed"].dropna().unique()))
        record["run_ids"] = ",".join(sorted(runs["run_id"].astype(str)))
        record[PATH_COLUMN] = sorted(runs[PATH_COLUMN])[-1]
        records.append(record)
    return pd.DataFrame.from_records(records)


def protocol_fields(frame: pd.DataFrame) -> pd.DataFrame:
    """Per protocol_id: model, task and the human-readable protocol fields (first row's values)."""
    columns = ["protocol_id", "model", "task", "n_samples", "eval", "cfg", "top_k", "top_p", "dtype"]
    return frame[columns].drop_duplicates("protocol_id").set_index("protocol_id")


def describe_protocol(fields: pd.Series) -> str:
    """``n=1000, cfg 1.5, top-k 0, top-p 0.96, fp32`` — what distinguishes one protocol's numbers."""
    parts = [f"n={_text(fields.get('n_samples'))}"]
    for name, label in (("cfg", "cfg"), ("top_k", "top-k"), ("top_p", "top-p"), ("dtype", "")):
        value = fields.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{label} {_text(value)}".strip())
    return ", ".join(parts)


def warn_kept_apart(frame: pd.DataFrame) -> None:
    """Say which rows of one model × task are tabulated apart because their protocols differ, and in what."""
    if frame.empty:
        return
    fields = ["n_samples", "eval", "cfg", "top_k", "top_p", "dtype", "model_id"]
    for (model, task), rows in frame.groupby(["model", "task"], sort=True):
        protocols = list(dict.fromkeys(rows["protocol_id"]))
        if len(protocols) < 2:
            continue
        first = rows.loc[rows["protocol_id"].eq(protocols[0])].iloc[0]
        for other in protocols[1:]:
            those = rows.loc[rows["protocol_id"].eq(other)]
            row = those.iloc[0]
            differing = [f for f in fields if _text(row.get(f)) != _text(first.get(f))]
            shown = [f for f in differing if f != "model_id"] or differing
            if shown:
                what = ", ".join(f"{f}={_text(row.get(f))}" for f in shown)
                than = ", ".join(f"{f}={_text(first.get(f))}" for f in shown)
            else:
                what, than = f"protocol {other}", f"protocol {protocols[0]}"
            if shown == ["model_id"]:
                what, than = "another model identity (checkpoint or config)", "the first"
            elif not shown and other.startswith("legacy:") != protocols[0].startswith("legacy:"):
                # an older row cannot prove it shares the recorded protocol, so it is not merged with it
                what, than = (("no recorded protocol_id (older row)", "rows that record one") if other.startswith(
                    "legacy:") else ("a recorded protocol_id", "older rows without one"))
            log.warning("%d rows of %s/%s with %s kept apart from %s (%d rows): different protocol (%s vs %s)",
                        len(those), model, task, what, than, int(rows["protocol_id"].eq(protocols[0]).sum()),
                        other, protocols[0])


def method_labels(frame: pd.DataFrame) -> pd.Series:
    """Display name of each row's method: the quant key, plus the calibration set when one table has the same
    method with several calibration sets (``ours (random)`` next to ``ours (resample)``), plus short hashes
    when only the method's hyper-parameters (``ours [q 1a2b3c]``) or the calibration config differ, plus the backend
    whenever it is not the default (``rtn [fp8]``), so fp8 rows are never read as fake-quantized ones."""
    group = [c for c in ("protocol_id", "task") if c in frame.columns]
    label = frame["quant"].astype(str)
    n_calib = frame.groupby([*group, "quant"])["calib"].transform("nunique")
    label = label.where(n_calib.le(1), label + " (" + frame["calib"].astype(str) + ")")
    if "quant_id" in frame.columns:
        n_quant = frame.groupby([*group, "quant"])["quant_id"].transform("nunique")
        label = label.where(n_quant.le(1), label + " [q " + frame["quant_id"].astype(str).str[:6] + "]")
    if "calib_id" in frame.columns:
        n_cid = frame.groupby([*group, "quant", "calib"])["calib_id"].transform("nunique")
        label = label.where(n_cid.le(1), label + " [c " + frame["calib_id"].astype(str).str[:6] + "]")
    if "backend" in frame.columns:
        backend = frame["backend"].fillna(DEFAULT_BACKEND).astype(str)
        label = label.where(backend.eq(DEFAULT_BACKEND), label + " [" + backend + "]")
    return label
