"""Published numbers (``results/published/published.csv``): loading, selection, and what to say about their source.

Every published row carries its ``source`` (paper, figure or table it was read from) and ``caveat`` (``; ``-separated
warnings such as "transcribed from a figure"). A table that shows paper rows names the source and the caveats
shared by all of them in a note; a caveat that only some rows carry (Shift-and-Sum's re-implemented LiteVAR) marks
those rows with ``‡`` and gets its own note.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

PUBLISHED_COLUMNS: tuple[str, ...] = ("paper", "table", "model", "method", "wa", "metric", "value", "source", "caveat")
ROW_MARK = "‡"

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
    if "caveat" not in frame.columns:  # a CSV without caveats still loads; its rows just carry none
        frame["caveat"] = ""
    missing = [column for column in PUBLISHED_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {list(PUBLISHED_COLUMNS)}")
    return frame.assign(value=pd.to_numeric(frame["value"], errors="raise"), caveat=frame["caveat"].fillna(""))


def _caveats(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(";") if part.strip()]


def paper_table(published: pd.DataFrame, paper_and_table: tuple[str, str]) -> pd.DataFrame:
    """The rows of one published table, renamed to the row vocabulary (``wa`` → ``bits``, ``method`` → ``quant``),
    with ``row_mark`` (``‡`` where the row carries a caveat that not every row of the table shares)."""
    paper, table = paper_and_table
    chosen = published.loc[published["paper"].eq(paper) & published["table"].eq(table)]
    chosen = chosen.rename(columns={"wa": "bits", "method": "quant"})
    common = _common_caveats(chosen)
    marks = chosen["caveat"].map(lambda c: ROW_MARK if set(_caveats(c)) - common else "")
    return chosen.assign(row_mark=marks)[["model", "bits", "quant", "metric", "value", "source", "caveat", "row_mark"]]


def _common_caveats(rows: pd.DataFrame) -> set[str]:
    sets = [set(_caveats(c)) for c in rows["caveat"]]
    return set.intersection(*sets) if sets else set()


def source_notes(rows: pd.DataFrame) -> tuple[str, ...]:
    """Notes naming where the shown paper rows come from and their caveats (empty when no paper row is shown)."""
    if rows.empty:
        return ()
    notes = [f"Paper rows: {source}." for source in dict.fromkeys(rows["source"])]
    common = _common_caveats(rows)
    ordered = list(dict.fromkeys(c for text in rows["caveat"] for c in _caveats(text)))
    if common:
        notes.append("Caveats: " + "; ".join(c for c in ordered if c in common) + ".")
    partial = [c for c in ordered if c not in common]
    if partial:
        methods = sorted(set(rows.loc[rows["caveat"].map(lambda t: bool(set(_caveats(t)) - common)), "quant"]))
        notes.append(f"{ROW_MARK} ({', '.join(methods)}): " + "; ".join(partial) + ".")
    return tuple(notes)
