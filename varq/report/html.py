"""A single offline ``report.html``: tables, plots and sample grids embedded as base64 (no external links)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from varq.atomic import write_text_atomic
from varq.report.layout import Table
from varq.report.render import to_html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.paper td { color: #666; font-style: italic; }
.note { font-size: 12px; color: #555; }
figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 12px; color: #555; max-width: 40em; }
"""


@dataclass(frozen=True)
class Image:
    caption: str
    png: bytes


def _img(image: Image, max_width: str) -> str:
    encoded = base64.b64encode(image.png).decode("ascii")
    return (f'<figure><img alt="{html.escape(image.caption)}" style="max-width:{max_width}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(image.caption)}</figcaption></figure>')


def write_report(path: Path, tables: Sequence[Table], plots: Sequence[Image], grids: Sequence[Image], intro: str) -> None:
    """Write the report; every resource is inline so the file can be mailed or opened offline."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>varq report</title>"
             f"<style>{STYLE}</style></head><body>", "<h1>varq — PTQ comparison report</h1>",
             f"<p>{html.escape(intro)}</p>"]
    parts += [to_html(table) for table in tables]
    if plots:
        parts.append("<h2>FID and FID2FP16 against bit-width</h2>")
        parts += [_img(image, "100%") for image in plots]
    if grids:
        parts.append("<h2>Sample grids</h2>")
        parts += [_img(image, "24em") for image in grids]
    parts.append("</body></html>\n")
    write_text_atomic(path, "\n".join(parts))
