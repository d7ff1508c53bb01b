"""Paired method comparisons over seeds: does method A beat method B at a bit-width?

Two runs pair when they share the eval seed and, where both methods calibrate, the calibration seed; a method
without calibration (its ``calib_seed`` is null) pairs with every calibration seed of the other at the same
eval seed, since its numbers cannot depend on one. Repeats of the same pair key are averaged first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from varq.report.rows import CELL_COLUMNS, describe_protocol, method_labels, protocol_fields
from varq.report.stats import PairedResult, paired_comparison
from varq.report.vocab import FP_BITS, HIGHER_IS_BETTER, bits_label, metric_label

NO_SEED = -1.0  # stands for a null calib_seed inside a pair key


def paired_values(a_runs: pd.DataFrame, b_runs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) arrays of matched runs' metric values, in pair-key order."""
    def keyed(runs: pd.DataFrame, with_calib: bool) -> pd.Series:
        keys = [runs["seed"].fillna(NO_SEED)]
        if with_calib:
            keys.append(runs["calib_seed"].fillna(NO_SEED))
        return runs[metric].astype("float64").groupby(keys).mean()

    with_calib = bool(a_runs["calib_seed"].notna().any() and b_runs["calib_seed"].notna().any())
    a, b = keyed(a_runs, with_calib), keyed(b_runs, with_calib)
    if not with_calib and a_runs["calib_seed"].notna().any():
        # A calibrates, B does not: A keeps one value per (eval seed, calib seed), each paired with B's eval seed.
        a = a_runs[metric].astype("float64").groupby([a_runs["seed"].fillna(NO_SEED),
                                                      a_runs["calib_seed"].fillna(NO_SEED)]).mean()
        b = b.reindex(a.index.get_level_values(0))
        return a.to_numpy(), b.to_numpy()
    if not with_calib and b_runs["calib_seed"].notna().any():
        b_full, a_full = paired_values(b_runs, a_runs, metric)
        return a_full, b_full
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    return joined["a"].to_numpy(), joined["b"].to_numpy()


def _cell_runs(rows: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    return {key: runs for key, runs in rows.groupby(list(CELL_COLUMNS), dropna=False, sort=False)}


def significant_marks(rows: pd.DataFrame, cells: pd.DataFrame, metrics: Sequence[str]) -> set[tuple[str, str, str]]:
    """(bits, method label, metric) of every best varq cell that is significantly better than the runner-up of its
    protocol × W/A block over paired seeds. ``cells`` are one protocol's aggregated cells (labels as in tables)."""
    marks: set[tuple[str, str, str]] = set()
    if cells.empty:
        return marks
    by_cell = _cell_runs(rows)
    labelled = cells.assign(method=method_labels(cells))
    for bits, block in labelled.loc[labelled["bits"].ne(FP_BITS)].groupby("bits"):
        for metric in metrics:
            if metric not in HIGHER_IS_BETTER or metric not in block.columns:
                continue
            ranked = block.dropna(subset=[metric]).sort_values(metric, ascending=not HIGHER_IS_BETTER[metric])
            if len(ranked) < 2:
                continue
            best, runner_up = ranked.iloc[0], ranked.iloc[1]
            a, b = paired_values(by_cell[tuple(best[list(CELL_COLUMNS)])], by_cell[tuple(runner_up[list(CELL_COLUMNS)])],
                                 metric)
            if paired_comparison(a, b, higher_is_better=HIGHER_IS_BETTER[metric]).verdict == "A":
                marks.add((str(bits), str(best["method"]), metric))
    return marks


@dataclass(frozen=True)
class Verdict:
    protocol: str
    model: str
    task: str
    bits: str
    metric: str
    result: PairedResult

    def line(self, a: str, b: str) -> str:
        r = self.result
        if r.n_pairs == 0:
            return (f"{self.model} {self.task} {bits_label(self.bits)} {metric_label(self.metric)}: no paired runs "
                    f"[{self.protocol}]")
        winner = {"A": f"{a} better", "B": f"{b} better", "tie": "no significant difference"}[r.verdict]
        return (f"{self.model} {self.task} {bits_label(self.bits)} {metric_label(self.metric)}: {a} − {b} = "
                f"{r.mean_diff:+.3f} [95 % CI {r.ci_low:+.3f}, {r.ci_high:+.3f}] over {r.n_pairs} pairs, "
                f"p = {r.p_value:.3g} → {winner} [{self.protocol}]")


def compare_methods(rows: pd.DataFrame, a: str, b: str, metrics: Sequence[str]) -> list[Verdict]:
    """Every (protocol, task, bits) where both methods have runs: paired verdicts for each metric.

    ``a``/``b`` are quant keys; when a protocol has a method under several calibration sets or hyper-parameters,
    each combination is compared (they are separate cells)."""
    verdicts: list[Verdict] = []
    if rows.empty:
        return verdicts
    protocols = protocol_fields(rows)
    for (protocol, task, bits), block in rows.loc[rows["bits"].ne(FP_BITS)].groupby(
            ["protocol_id", "task", "bits"], sort=True):
        a_cells = _cell_runs(block.loc[block["quant"].eq(a)])
        b_cells = _cell_runs(block.loc[block["quant"].eq(b)])
        described = f"{describe_protocol(protocols.loc[protocol])}; protocol {protocol}"
        for a_runs in a_cells.values():
            for b_runs in b_cells.values():
                for metric in metrics:
                    if metric not in HIGHER_IS_BETTER or a_runs[metric].isna().all() or b_runs[metric].isna().all():
                        continue
                    x, y = paired_values(a_runs, b_runs, metric)
                    result = paired_comparison(x, y, higher_is_better=HIGHER_IS_BETTER[metric])
                    verdicts.append(Verdict(described, str(a_runs["model"].iloc[0]), str(task), str(bits), metric,
                                            result))
    return verdicts
