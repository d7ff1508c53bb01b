"""Text renderings of a :class:`~varq.report.layout.Table`: markdown, LaTeX, CSV and an HTML fragment.

A cell averaged over repeated runs reads ``mean ± std [CI low, CI high]`` (95 % bootstrap CI of the mean) in
every format; a single run is just its value. ``†`` marks a best value that is significantly better than the
runner-up of its block over paired seeds.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from varq.report.layout import Table
from varq.report.vocab import DELTA_PREFIX, MISSING, bits_label, metric_label

LEVEL_LABELS: dict[str, str] = {"model": "model", "bits": "W/A", "method": "method", "source": "source"}
DEFAULT_DECIMALS = 2


def _format_number(table: Table, column: str, value: float) -> str:
    """Fixed decimals per metric; Δ columns always carry a sign so that improvements read at a glance."""
    is_delta = column.startswith(DELTA_PREFIX)
    metric = column[len(DELTA_PREFIX):] if is_delta else column
    digits = table.decimals.get(metric, DEFAULT_DECIMALS)
    return f"{value:+.{digits}f}" if is_delta else f"{value:.{digits}f}"


SIGNIFICANT_MARK = "†"
NOTE_SPREAD = ("Cells over repeated runs: mean ± std [95 % bootstrap CI of the mean, 10,000 resamples]; "
               "n: samples per run; runs: runs averaged in the cell (calibration and/or eval seeds). "
               f"{SIGNIFICANT_MARK}: best of its block and significantly better than the runner-up over paired seeds "
               "(sign-flip p < 0.05 and CI of the paired difference excluding 0). Δ: difference of the means.")


@dataclass(frozen=True)
class Cell:
    """One rendered table entry: ``text`` None when missing; ``spread`` = (std, CI low, CI high) texts if repeated."""

    text: str | None
    best: bool
    significant: bool
    spread: tuple[str, str, str] | None


def _finite(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _cells(table: Table) -> Iterator[tuple[tuple[str, ...], list[Cell]]]:
    """Yield (row key, cells) in table order."""
    for position, key in enumerate(table.values.index):
        key_tuple = key if isinstance(key, tuple) else (key,)
        row: list[Cell] = []
        for column in table.values.columns:
            value = table.values[column].iloc[position]
            text = _format_number(table, column[-1], float(value)) if _finite(value) else None
            spread = None
            if text is not None and table.spread:
                std, low, high = (table.spread[f][column].iloc[position] for f in ("std", "ci_low", "ci_high"))
                if _finite(std) and _finite(low) and _finite(high):
                    spread = tuple(_format_number(table, column[-1], float(v)) for v in (std, low, high))
            significant = table.significant is not None and bool(table.significant[column].iloc[position])
            row.append(Cell(text, bool(table.best[column].iloc[position]), significant, spread))
        yield tuple(str(part) for part in key_tuple), row


def _key_display(levels: list[str], key: tuple[str, ...], previous: tuple[str, ...] | None) -> list[str]:
    """Row-header texts; a level repeated from the line above is left blank (paper style), source never is."""
    shown: list[str] = []
    for i, (level, part) in enumerate(zip(levels, key)):
        same_prefix = previous is not None and previous[: i + 1] == key[: i + 1]
        text = bits_label(part) if level == "bits" else part
        shown.append("" if same_prefix and level != "source" else text)
    return shown


def _column_titles(table: Table) -> list[str]:
    return [f"{group} {metric_label(column)}".strip() for group, column in table.values.columns]


def to_markdown(table: Table) -> str:
    """GitHub markdown: bold best values, ``–`` for missing cells, notes below the table."""
    levels = list(table.values.index.names)
    header = [LEVEL_LABELS.get(level, level) for level in levels] + _column_titles(table)
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] * len(levels) + ["---:"] * len(table.values.columns)) + "|"]
    previous: tuple[str, ...] | None = None
    for key, row in _cells(table):
        texts = [_markdown_cell(cell) for cell in row]
        lines.append("| " + " | ".join(_key_display(levels, key, previous) + texts) + " |")
        previous = key
    for note in table.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _CellStyle:
    """How one output format writes a cell: missing value, best (bold), significance mark, spread."""

    missing: str
    bold: str  # str.format template of the value
    mark: str
    spread: str  # str.format template with main, std, low, high


_STYLES = {
    "markdown": _CellStyle(MISSING, "**{}**", SIGNIFICANT_MARK, "{main} ± {std} [{low}, {high}]"),
    "latex": _CellStyle("--", r"\textbf{{{}}}", r"$^\dagger$",
                        r"{main}{{\scriptsize$\pm${std}}} {{\tiny[{low}, {high}]}}"),
    "html": _CellStyle(MISSING, "<b>{}</b>", SIGNIFICANT_MARK, "{main} ± {std} <small>[{low}, {high}]</small>"),
}


def _format_cell(cell: Cell, style: _CellStyle) -> str:
    if cell.text is None:
        return style.missing
    main = style.bold.format(cell.text) if cell.best else cell.text
    if cell.significant:
        main += style.mark
    if cell.spread is None:
        return main
    std, low, high = cell.spread
    return style.spread.format(main=main, std=std, low=low, high=high)


def _markdown_cell(cell: Cell) -> str:
    return _format_cell(cell, _STYLES["markdown"])


def _latex_cell(cell: Cell) -> str:
    return _format_cell(cell, _STYLES["latex"])


def _html_cell(cell: Cell) -> str:
    return _format_cell(cell, _STYLES["html"])


def _latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "Δ": r"$\Delta$", "–": "--", "±": r"$\pm$",
                    "†": r"$^\dagger$", "‡": r"$^\ddagger$", "−": "-", "×": r"$\times$", "≥": r"$\geq$",
                    "<": r"$<$", ">": r"$>$", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(replacements.get(char, char) for char in text)


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment; model groups become multicolumn headers, W/A blocks get rules."""
    levels = list(table.values.index.names)
    n_levels, columns = len(levels), list(table.values.columns)
    groups = list(dict.fromkeys(group for group, _ in columns))
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(table.title)}}}",
             r"\begin{tabular}{" + "l" * n_levels + "r" * len(columns) + "}", r"\toprule"]
    if groups != [""]:
        spans, rules, start = [], [], n_levels + 1
        for group in groups:
            width = sum(1 for g, _ in columns if g == group)
            spans.append(rf"\multicolumn{{{width}}}{{c}}{{{_latex_escape(group)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
            start += width
        lines += [" & " * n_levels + " & ".join(spans) + r" \\", "".join(rules)]
    header = [LEVEL_LABELS.get(level, level) for level in levels] + [metric_label(c) for _, c in columns]
    lines += [" & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    block_positions = [levels.index(level) for level in table.block_levels if level in levels]
    previous: tuple[str, ...] | None = None
    for key, row in _cells(table):
        if previous is not None and any(previous[i] != key[i] for i in block_positions):
            lines.append(r"\midrule")
        texts = [_latex_cell(cell) for cell in row]
        keys = [_latex_escape(part) for part in _key_display(levels, key, previous)]
        lines.append(" & ".join(keys + texts) + r" \\")
        previous = key
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\footnotesize " + r" \\ ".join(_latex_escape(note) for note in table.notes))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv_frame(table: Table) -> pd.DataFrame:
    """The same layout with raw numbers (no rounding, no marks); missing cells stay empty. Each metric column is
    followed by its ``_std``, ``_ci_low``, ``_ci_high`` and ``_significant`` columns (empty/False for single runs)."""
    def name(group: str, column: str) -> str:
        return f"{group}/{column}" if group else column

    parts: dict[str, pd.Series] = {}
    for group, column in table.values.columns:
        parts[name(group, column)] = table.values[(group, column)]
        has_spread = table.spread and any(table.spread[f][(group, column)].notna().any() for f in table.spread)
        if has_spread:
            for field_name, frame in table.spread.items():
                parts[name(group, f"{column}_{field_name}")] = frame[(group, column)]
        if table.significant is not None and table.significant[(group, column)].any():
            parts[name(group, f"{column}_significant")] = table.significant[(group, column)]
    flat = pd.DataFrame(parts, index=table.values.index)
    return flat.reset_index()


def to_html(table: Table) -> str:
    """An HTML ``<table>`` fragment with the same marks as the markdown (bold best, ``–`` missing)."""
    levels = list(table.values.index.names)
    columns = list(table.values.columns)
    groups = list(dict.fromkeys(group for group, _ in columns))
    head: list[str] = []
    if groups != [""]:
        spans = "".join(f'<th colspan="{sum(1 for g, _ in columns if g == group)}">{html.escape(group)}</th>'
                        for group in groups)
        head.append(f'<tr><th colspan="{len(levels)}"></th>{spans}</tr>')
    labels = [LEVEL_LABELS.get(level, level) for level in levels] + [metric_label(c) for _, c in columns]
    head.append("<tr>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>")
    body: list[str] = []
    previous: tuple[str, ...] | None = None
    for key, row in _cells(table):
        keys = "".join(f"<td>{html.escape(part)}</td>" for part in _key_display(levels, key, previous))
        cells = "".join(f'<td class="num">{_html_cell(cell)}</td>' for cell in row)
        source_class = html.escape(key[levels.index("source")]) if "source" in levels else ""
        body.append(f'<tr class="{source_class}">{keys}{cells}</tr>')
        previous = key
    notes = "".join(f"<p class=\"note\">{html.escape(note)}</p>" for note in table.notes)
    return (f"<h2>{html.escape(table.title)}</h2>\n<table>\n<thead>{''.join(head)}</thead>\n"
            f"<tbody>\n" + "\n".join(body) + f"\n</tbody>\n</table>\n{notes}\n")
