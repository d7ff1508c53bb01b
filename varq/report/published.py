"""Published numbers (``results/published/published.csv``): loading and selection."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

PUBLISHED_COLUMNS: tuple[str, ...] = ("paper", "table", "model", "method", "wa", "metric", "value", "source")

# The paper tables that varq's two layouts sit next to: (paper, table) in published.csv.
SHIFT_AND_SUM_VAR = ("shift_and_sum", "var_depths")
PTQ4ARVG_VAR = ("ptq4arvg", "var")


def load_published(path: Path | None) -> pd.DataFrame:
    """Read the published-numbers CSV; an absent file gives an empty frame (tables then show varq only)."""
    if path is None or not path.is_file():
        if path is not None:
            log.warning("published numbers not found at %s; tables show varq rows only", path)
        return pd.DataFrame({column: pd.Series(dtype="object") for column in PUBLISHED_COLUMNS})
    frame = pd.read_csv(path, dtype={column: "string" for column in PUBLISHED_COLUMNS if column != "value"})
    missing = [column for column in PUBLISHED_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {list(PUBLISHED_COLUMNS)}")
    return frame.assign(value=pd.to_numeric(frame["value"], errors="raise"))


def paper_table(published: pd.DataFrame, paper_and_table: tuple[str, str]) -> pd.DataFrame:
    """The rows of one published table, renamed to the row vocabulary (``wa`` → ``bits``, ``method`` → ``quant``)."""
    paper, table = paper_and_table
    chosen = published.loc[published["paper"].eq(paper) & published["table"].eq(table)]
    return chosen.rename(columns={"wa": "bits", "method": "quant"})[["model", "bits", "quant", "metric", "value"]]
