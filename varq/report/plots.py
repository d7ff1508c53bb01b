"""FID / FID2FP16 against bit-width, one PNG per model and protocol (varq solid with 95 % CI error bars, paper dashed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

from varq.report.vocab import BITS_ORDER, FP_BITS, METHOD_ORDER, bits_label, metric_label, rank

PLOT_METRICS: tuple[str, ...] = ("fid", "fid2fp16")


def bits_curves_png(cells: pd.DataFrame, model: str, title: str, metrics: Sequence[str] = PLOT_METRICS) -> bytes | None:
    """Render one model's metrics against W/A (harsher to the right) and return PNG bytes, or None if no data."""
    figure = bits_curves_figure(cells, model, title, metrics)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def bits_curves_figure(cells: pd.DataFrame, model: str, title: str, metrics: Sequence[str] = PLOT_METRICS):
    """The matplotlib Figure behind :func:`bits_curves_png` (None if no data).

    Uses an explicit Agg canvas instead of pyplot so that nothing global (backend, current figure) changes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = cells.loc[cells["model"].eq(model) & cells["metric"].isin(metrics)].dropna(subset=["value"])
    # Runs per cell go into the legend ("ours (varq, 8 runs)"); n is in the title (the protocol).
    runs = cells.loc[cells["model"].eq(model) & cells["metric"].eq("runs")].dropna(subset=["value"])
    runs_of = {m: sorted({int(v) for v in group["value"]}) for m, group in runs.groupby("method")}
    if data.empty:
        return None
    bits = sorted((b for b in data["bits"].unique() if b != FP_BITS), key=lambda b: rank(BITS_ORDER, b))
    methods = sorted((m for m in data["method"].unique() if m != "fp16"),
                     key=lambda m: (rank(METHOD_ORDER, m.split(" ")[0]), m))
    figure = Figure(figsize=(5.0 * len(metrics), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    for axis_index, metric in enumerate(metrics):
        axis = figure.add_subplot(1, len(metrics), axis_index + 1)
        subset = data.loc[data["metric"].eq(metric)]
        for source, style, marker in (("varq", "-", "o"), ("paper", "--", "s")):
            from_source = subset.loc[subset["source"].eq(source)]
            reference = from_source.loc[from_source["bits"].eq(FP_BITS), "value"]
            if not reference.empty:
                axis.axhline(reference.iloc[0], color="grey", linestyle=style, linewidth=1, label=f"fp16 ({source})")
            for method in methods:
                line = from_source.loc[from_source["method"].eq(method)]
                if line.empty:
                    continue
                line = line.assign(_x=[bits.index(b) for b in line["bits"]]).sort_values("_x")
                y = line["value"].to_numpy(dtype="float64")
                low = line["ci_low"].to_numpy(dtype="float64") if "ci_low" in line else y * float("nan")
                high = line["ci_high"].to_numpy(dtype="float64") if "ci_high" in line else y * float("nan")
                # Seed repeats: the bar spans the 95 % bootstrap CI of the mean; single runs get none.
                yerr = [np.nan_to_num(y - low, nan=0.0), np.nan_to_num(high - y, nan=0.0)]
                axis.errorbar(line["_x"].to_numpy(), y, yerr=yerr, fmt=style, marker=marker, capsize=3,
                              color=colours[method], label=_label(method, source, runs_of.get(method)))
        axis.set_xticks(range(len(bits)), [bits_label(b) for b in bits])
        axis.set_xlabel("W/A")
        axis.set_ylabel(metric_label(metric))
        axis.grid(alpha=0.3)
        if axis_index == 0:
            axis.legend(fontsize="x-small")
    figure.suptitle(title, fontsize="medium")
    return figure


def _label(method: str, source: str, runs: list[int] | None) -> str:
    if source != "varq" or not runs:
        return f"{method} ({source})"
    count = str(runs[0]) if len(runs) == 1 else f"{runs[0]}–{runs[-1]}"
    return f"{method} ({source}, {count} run{'s' if runs[-1] > 1 else ''})"
