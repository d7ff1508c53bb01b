"""Shared vocabulary of the reports: orderings, metric directions and display labels.

Keys are the strings used in result rows and in ``results/published/published.csv``; display labels
only exist at the rendering edge.
"""

from __future__ import annotations

import re

# Paper order: the FP reference first, then from mild to harsh quantization.
BITS_ORDER: tuple[str, ...] = ("fp16", "w8a8", "w6a6", "w4a8", "w4a6", "w4a4")

# Reference first, baselines next, our methods last (as in the Shift-and-Sum table).
METHOD_ORDER: tuple[str, ...] = (
    "fp16", "rtn", "smoothquant", "brecq", "litevar", "ptq4arvg", "ours", "ours_litevar",
)

SOURCE_ORDER: tuple[str, ...] = ("varq", "paper")

FP_BITS = "fp16"

# Direction of "better"; metrics not listed here are shown but never marked best.
HIGHER_IS_BETTER: dict[str, bool] = {
    "inception_score": True,
    "precision": True,
    "recall": True,
    "class_accuracy": True,
    "fid": False,
    "fid2fp16": False,
    "sfid": False,
}

METRIC_LABELS: dict[str, str] = {
    "inception_score": "IS",
    "fid": "FID",
    "fid2fp16": "FID2FP16",
    "sfid": "sFID",
    "precision": "Prec",
    "recall": "Rec",
    "class_accuracy": "Acc",
}

DELTA_PREFIX = "delta_"
MISSING = "–"


def metric_label(column: str) -> str:
    """Display label of a metric or delta column (``delta_fid`` → ``ΔFID``)."""
    if column.startswith(DELTA_PREFIX):
        return "Δ" + metric_label(column[len(DELTA_PREFIX):])
    return METRIC_LABELS.get(column, column)


def bits_label(bits: str) -> str:
    """``w4a4`` → ``W4A4``, ``fp16`` → ``FP16``."""
    return bits.upper()


def rank(order: tuple[str, ...], key: str) -> int:
    """Position of key in order; unknown keys sort after every known one."""
    return order.index(key) if key in order else len(order)


def model_sort_key(model: str) -> tuple[int, str]:
    """var_digits first, then VAR depths numerically (d16 < d20 < d30), then anything else by name."""
    if model == "var_digits":
        return (0, model)
    match = re.fullmatch(r"var_d(\d+)", model)
    if match:
        return (1, f"{int(match.group(1)):04d}")
    return (2, model)
