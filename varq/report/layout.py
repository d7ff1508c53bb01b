"""Paper-style comparison tables: varq rows next to published rows, deltas and best-value marks.

A table is built from *cells*, a long frame (model, bits, method, source, metric, value, and the spread of
the value over the cell's seed repeats). Rows of the table are (W/A, method, source) — optionally led by the
model — so each varq line sits directly above the paper's line for the same method and bit-width, and the
columns keep the paper's own structure (one group per model in the Shift-and-Sum layout, one column per metric
in the PTQ4ARVG layout). Every group ends with ``n`` (samples per run) and ``runs`` (runs averaged in the cell).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from varq.report.rows import method_labels
from varq.report.vocab import (
    BITS_ORDER,
    DELTA_PREFIX,
    FP_BITS,
    HIGHER_IS_BETTER,
    METHOD_ORDER,
    SOURCE_ORDER,
    model_sort_key,
    rank,
)

LONG_COLUMNS: tuple[str, ...] = (
    "model", "bits", "quant", "method", "calib", "source", "metric", "value", "std", "ci_low", "ci_high",
    "significant",
)
SPREAD_FIELDS: tuple[str, ...] = ("std", "ci_low", "ci_high")
N_COLUMN, RUNS_COLUMN = "n", "runs"  # pseudo-metrics: samples per run and runs per cell


@dataclass(frozen=True)
class Table:
    """A renderer-agnostic table: numbers, best marks and how to print them."""

    name: str                     # file stem, e.g. "shift_and_sum_class_cond_var_d16"
    title: str
    values: pd.DataFrame          # rows: MultiIndex (row_levels); columns: MultiIndex (group, column)
    best: pd.DataFrame            # same shape as values; True where the value is the best of its block
    block_levels: tuple[str, ...] # row levels whose change starts a new block (rule in LaTeX)
    decimals: dict[str, int]
    notes: tuple[str, ...] = ()
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)  # the long data behind it (plots use it)
    # Same shape as values: spread over seed repeats (NaN for a single run and for paper rows) and where the
    # best value is also significantly better than the runner-up over paired seeds.
    spread: dict[str, pd.DataFrame] = field(default_factory=dict)
    significant: pd.DataFrame | None = None


def _empty_long() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype="object") for column in LONG_COLUMNS})


def varq_cells(cells: pd.DataFrame, metrics: Sequence[str], significant: set[tuple[str, str, str]] | None = None,
               ) -> pd.DataFrame:
    """Aggregated cells (:func:`varq.report.rows.aggregate_cells`) → long cells, with n and runs as two more
    pseudo-metrics. Cells whose metrics are all null still yield NaN cells, so a run that exists shows up as a
    line of missing values instead of disappearing. ``significant`` holds (bits, method label, metric) to mark."""
    if cells.empty:
        return _empty_long()
    labelled = cells.assign(method=method_labels(cells), source="varq")
    ids = ["model", "bits", "quant", "method", "calib", "source"]
    parts: list[pd.DataFrame] = []
    for metric in metrics:
        if metric not in labelled.columns:
            continue
        part = labelled[ids].assign(metric=metric, value=labelled[metric])
        for spread in SPREAD_FIELDS:
            part[spread] = labelled.get(f"{metric}_{spread}", pd.Series(float("nan"), index=labelled.index))
        parts.append(part)
    for pseudo, column in ((N_COLUMN, "n_samples"), (RUNS_COLUMN, "n_runs")):
        parts.append(labelled[ids].assign(metric=pseudo, value=pd.to_numeric(labelled[column], errors="coerce")))
    long = pd.concat(parts, ignore_index=True)
    marked = significant or set()
    long["significant"] = [(b, m, k) in marked for b, m, k in zip(long["bits"], long["method"], long["metric"])]
    return long.reindex(columns=list(LONG_COLUMNS))


def paper_cells(paper_rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Published rows → long cells (source ``paper``, a dagger-marked method where the row has its own caveat)."""
    chosen = paper_rows.loc[paper_rows["metric"].isin(metrics)]
    method = chosen["quant"]
    if "row_mark" in chosen.columns:
        method = method + chosen["row_mark"].fillna("")
    long = chosen.assign(method=method, calib="", source="paper", significant=False)
    return long.reindex(columns=list(LONG_COLUMNS))


def _row_order(keys: pd.DataFrame, *, by_model: bool) -> pd.DataFrame:
    """Sort row keys in paper order: (model,) W/A (FP16 first), method, then varq before paper."""
    ranked = keys.assign(
        _model=keys["model"].map(model_sort_key),
        _bits=keys["bits"].map(lambda b: rank(BITS_ORDER, b)),
        _method=keys["quant"].map(lambda q: rank(METHOD_ORDER, q)),
        _source=keys["source"].map(lambda s: rank(SOURCE_ORDER, s)),
    )
    order = ["_bits", "bits", "_method", "quant", "_source", "calib"]
    return ranked.sort_values(["_model", *order] if by_model else order, kind="stable")


def _best_mask(values: pd.DataFrame, block_levels: Sequence[str]) -> pd.DataFrame:
    """Best value per column within each block (e.g. one W/A) and source, FP16 rows excluded.

    Comparing within a bit-width is what the papers bold; comparing across sources would pit two
    evaluation protocols against each other. A lone candidate is not marked: "best of one" says nothing.
    """
    best = pd.DataFrame(False, index=values.index, columns=values.columns)
    row_keys = values.index.to_frame(index=False)
    candidates = ~row_keys["bits"].eq(FP_BITS).to_numpy()
    groups = row_keys[[*block_levels, "source"]].astype(str).agg("|".join, axis=1).to_numpy()
    for column in values.columns:
        metric = column[-1]
        if metric not in HIGHER_IS_BETTER:
            continue  # deltas and unknown metrics: no direction to judge (Δ would repeat the metric's mark)
        series = pd.Series(values[column].to_numpy(), dtype="float64").where(candidates)
        by_block = series.groupby(groups)
        target = by_block.transform("max" if HIGHER_IS_BETTER[metric] else "min")
        count = by_block.transform("count")
        best[column] = (series.eq(target) & count.ge(2)).to_numpy()
    return best


def build_table(
    cells: pd.DataFrame,
    *,
    name: str,
    title: str,
    row_levels: Sequence[str],
    group_by_model: bool,
    metrics: Sequence[str],
    delta_metrics: Sequence[str],
    block_levels: Sequence[str],
    decimals: dict[str, int],
    notes: Sequence[str] = (),
    drop_empty_metrics: bool = False,
) -> Table:
    """Pivot long cells into a comparison table with Δ columns (vs the FP16 row of the same source and model)."""
    cells = cells.reset_index(drop=True)
    models = sorted(cells["model"].dropna().unique(), key=model_sort_key)
    if drop_empty_metrics:
        metrics = [m for m in metrics if cells.loc[cells["metric"].eq(m), "value"].notna().any()]
    deltas = [m for m in delta_metrics if m in metrics]
    trailing = [N_COLUMN, RUNS_COLUMN]

    levels = list(row_levels)
    row_keys = _row_order(
        cells[["model", "bits", "quant", "method", "calib", "source"]].drop_duplicates(), by_model="model" in levels,
    )
    index = pd.MultiIndex.from_frame(row_keys[levels].drop_duplicates())

    group = cells["model"] if group_by_model else pd.Series("", index=cells.index)
    long = cells.assign(group=group, significant=cells["significant"].fillna(False).astype(float))
    groups = models if group_by_model else [""]
    columns: list[tuple[str, str]] = []
    for g in groups:
        columns += [(g, m) for m in metrics] + [(g, DELTA_PREFIX + m) for m in deltas] + [(g, t) for t in trailing]
    column_index = pd.MultiIndex.from_tuples(columns, names=["group", "column"])

    def pivot(field_name: str) -> pd.DataFrame:
        present = long.dropna(subset=[field_name])
        if present.empty:
            return pd.DataFrame(index=index, columns=column_index, dtype="float64")
        table = present.pivot_table(index=levels, columns=["group", "metric"], values=field_name, aggfunc="mean")
        return table.reindex(index=index, columns=column_index)

    values = _add_deltas(pivot("value"), groups, deltas, row_levels, group_by_model)
    spread = {field_name: pivot(field_name) for field_name in SPREAD_FIELDS}
    significant = pivot("significant").fillna(0.0).astype(bool)
    best = _best_mask(values, block_levels)
    return Table(
        name=name, title=title, values=values, best=best, block_levels=tuple(block_levels),
        decimals={**dict(decimals), N_COLUMN: 0, RUNS_COLUMN: 0}, notes=tuple(notes), cells=cells, spread=spread,
        significant=significant & best,
    )


def _add_deltas(
    values: pd.DataFrame, groups: Sequence[str], deltas: Sequence[str], row_levels: Sequence[str], group_by_model: bool,
) -> pd.DataFrame:
    """Fill Δ columns: value minus the FP16 value of the same source (and model). FP16 rows get no Δ."""
    keys = values.index.to_frame(index=False)
    is_fp = keys["bits"].eq(FP_BITS).to_numpy()
    # Baseline lookup key: the source, plus the model when models are rows rather than column groups.
    base_levels = ["source"] if group_by_model else ["model", "source"]
    base_key = keys[base_levels].astype(str).agg("|".join, axis=1)
    filled: dict[tuple[str, str], object] = {}
    for g in groups:
        for metric in deltas:
            column = values[(g, metric)].to_numpy()
            baseline = pd.Series(column, dtype="float64").where(is_fp).groupby(base_key.to_numpy()).transform("first")
            delta = pd.Series(column, dtype="float64") - baseline
            filled[(g, DELTA_PREFIX + metric)] = delta.where(~is_fp).to_numpy()
    return _assign_columns(values, filled)


def _assign_columns(values: pd.DataFrame, filled: dict[tuple[str, str], object]) -> pd.DataFrame:
    """Return a copy with MultiIndex columns replaced (``assign`` cannot address tuple column keys)."""
    out = values.copy()
    for column, data in filled.items():
        out[column] = data
    return out
