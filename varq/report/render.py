"""Text renderings of a :class:`~varq.report.layout.Table`: markdown, LaTeX, CSV and an HTML fragment."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator

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


def _cells(table: Table) -> Iterator[tuple[tuple[str, ...], list[tuple[str | None, bool]]]]:
    """Yield (row key, [(text or None if missing, is_best)]) in table order."""
    for position, key in enumerate(table.values.index):
        key_tuple = key if isinstance(key, tuple) else (key,)
        row: list[tuple[str | None, bool]] = []
        for column in table.values.columns:
            value = table.values[column].iloc[position]
            text = None if value is None or (isinstance(value, float) and math.isnan(value)) else _format_number(
                table, column[-1], float(value))
            row.append((text, bool(table.best[column].iloc[position])))
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
        texts = [MISSING if text is None else (f"**{text}**" if best else text) for text, best in row]
        lines.append("| " + " | ".join(_key_display(levels, key, previous) + texts) + " |")
        previous = key
    for note in table.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "Δ": r"$\Delta$", "–": "--"}
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
        texts = ["--" if text is None else (rf"\textbf{{{text}}}" if best else text) for text, best in row]
        keys = [_latex_escape(part) for part in _key_display(levels, key, previous)]
        lines.append(" & ".join(keys + texts) + r" \\")
        previous = key
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv_frame(table: Table) -> pd.DataFrame:
    """The same layout with raw numbers (no rounding, no marks); missing cells stay empty."""
    flat = table.values.copy()
    flat.columns = [f"{group}/{column}" if group else column for group, column in table.values.columns]
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
        cells = "".join(
            f'<td class="num">{MISSING if text is None else (f"<b>{text}</b>" if best else text)}</td>'
            for text, best in row)
        source_class = html.escape(key[levels.index("source")]) if "source" in levels else ""
        body.append(f'<tr class="{source_class}">{keys}{cells}</tr>')
        previous = key
    notes = "".join(f"<p class=\"note\">{html.escape(note)}</p>" for note in table.notes)
    return (f"<h2>{html.escape(table.title)}</h2>\n<table>\n<thead>{''.join(head)}</thead>\n"
            f"<tbody>\n" + "\n".join(body) + f"\n</tbody>\n</table>\n{notes}\n")
