"""Result rows → paper-style comparison tables next to the published numbers.

    python -m varq.tables --root runs --out results/tables [--models var_d16 var_d24] [--methods ours brecq]
        [--bits w4a4 w6a6] [--metrics inception_score fid fid2fp16] [--tasks class_cond] [--deltas fid]
        [--published results/published/published.csv]

Writes, per task, the Shift-and-Sum layout (rows = W/A × method × source, columns = model × metric) and the
PTQ4ARVG layout (rows = model × W/A × method × source, columns = metrics) as markdown, LaTeX and CSV; FID
and FID2FP16 against bit-width plots (PNG); ``rows.csv`` with the selected runs; and a self-contained
``report.html``. The Shift-and-Sum markdown is also printed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from varq.report.html import Image, write_report
from varq.report.layout import Table, build_table, paper_cells, varq_cells
from varq.report.plots import bits_curves_png
from varq.report.published import PTQ4ARVG_VAR, SHIFT_AND_SUM_VAR, load_published, paper_table
from varq.report.qualitative import qualitative_png
from varq.report.render import to_csv_frame, to_latex, to_markdown
from varq.report.rows import PATH_COLUMN, collapse_repeats, dedupe_runs, load_rows, select
from varq.report.vocab import FP_BITS

log = logging.getLogger(__name__)

DEFAULT_ROOTS: tuple[str, ...] = ("runs", "outputs", "multirun")
DEFAULT_METRICS: tuple[str, ...] = ("inception_score", "fid", "fid2fp16")
PTQ4ARVG_METRICS: tuple[str, ...] = ("inception_score", "fid", "sfid", "precision", "recall")
PTQ4ARVG_BITS: tuple[str, ...] = (FP_BITS, "w8a8", "w6a6")
PAPER_TASK = "class_cond"  # every published number is class-conditional ImageNet 256²
DECIMALS: dict[str, int] = {"inception_score": 1, "fid": 2, "fid2fp16": 2, "sfid": 2, "precision": 2,
                            "recall": 2, "class_accuracy": 3}

NOTE_MARKS = ("Bold: best value of its W/A block among rows of the same source (FP16 excluded; "
              "not marked when only one value competes). –: no value.")
NOTE_DELTA = ("Δ: difference to the FP16 row of the same source and model — varq rows against our own FP16 run, "
              "paper rows against that paper's FP row — so degradation is compared across differing FP baselines.")


@dataclass(frozen=True)
class Selection:
    """What the user asked to see (None = everything)."""

    models: Sequence[str] | None = None
    methods: Sequence[str] | None = None
    bits: Sequence[str] | None = None
    tasks: Sequence[str] | None = None
    metrics: Sequence[str] = DEFAULT_METRICS
    deltas: Sequence[str] = ("fid",)


def _select_published(paper: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """Same filters as for our rows; the FP row is always kept because deltas need it."""
    mask = pd.Series(True, index=paper.index)
    is_fp = paper["bits"].eq(FP_BITS)
    if selection.models:
        mask &= paper["model"].isin(selection.models)
    if selection.methods:
        mask &= paper["quant"].isin(selection.methods) | is_fp
    if selection.bits:
        mask &= paper["bits"].isin(selection.bits) | is_fp
    return paper.loc[mask]


def build_tables(rows: pd.DataFrame, published: pd.DataFrame, selection: Selection) -> list[Table]:
    """Both layouts for every task present in the (already selected, deduplicated) rows.

    The class-conditional task is always tabulated when published numbers exist, so a fresh checkout
    still shows the paper tables with empty varq lines to fill.
    """
    collapsed = collapse_repeats(rows)
    tasks = sorted(collapsed["task"].dropna().unique())
    if PAPER_TASK not in tasks and not published.empty and (not selection.tasks or PAPER_TASK in selection.tasks):
        tasks = [PAPER_TASK, *tasks]
    tables: list[Table] = []
    for task in tasks:
        ours = collapsed.loc[collapsed["task"].eq(task)]
        with_paper = task == PAPER_TASK
        main_metrics = list(selection.metrics)
        main_cells = [varq_cells(ours, main_metrics)]
        if with_paper:
            main_cells.append(paper_cells(_select_published(paper_table(published, SHIFT_AND_SUM_VAR), selection),
                                          main_metrics))
        cells = pd.concat(main_cells, ignore_index=True)
        if cells.empty:
            continue
        source = " — paper: Shift-and-Sum (methods.md §6.1)" if with_paper else " — no published numbers"
        tables.append(build_table(
            cells, name=f"shift_and_sum_{task}", title=f"Shift-and-Sum layout, task {task}{source}",
            row_levels=("bits", "method", "source"), group_by_model=True, metrics=main_metrics,
            delta_metrics=selection.deltas, block_levels=("bits",), decimals=DECIMALS,
            notes=(NOTE_MARKS, NOTE_DELTA),
        ))

        wide_metrics = list(dict.fromkeys([*PTQ4ARVG_METRICS, *selection.metrics]))
        grid_cells = [varq_cells(ours, wide_metrics)]
        if with_paper:
            grid_cells.append(paper_cells(_select_published(paper_table(published, PTQ4ARVG_VAR), selection),
                                          wide_metrics))
        cells = pd.concat(grid_cells, ignore_index=True)
        cells = cells.loc[cells["bits"].isin(PTQ4ARVG_BITS)]
        if cells["bits"].ne(FP_BITS).any():
            source = " — paper: PTQ4ARVG (methods.md §6.2)" if with_paper else " — no published numbers"
            tables.append(build_table(
                cells, name=f"ptq4arvg_{task}", title=f"PTQ4ARVG layout, task {task}{source}",
                row_levels=("model", "bits", "method", "source"), group_by_model=False, metrics=wide_metrics,
                delta_metrics=selection.deltas, block_levels=("model", "bits"),
                decimals={**DECIMALS, "inception_score": 2}, notes=(NOTE_MARKS, NOTE_DELTA),
                drop_empty_metrics=True,
            ))
    return tables


def _sample_grids(rows: pd.DataFrame) -> list[Image]:
    """``grid.png`` files saved next to a selected row, captioned with the run they belong to."""
    grids: list[Image] = []
    for row in rows.itertuples(index=False):
        grid = Path(getattr(row, PATH_COLUMN)).with_name("grid.png")
        if grid.is_file():
            caption = f"{row.model} · {row.quant} · {row.bits} · calib {row.calib} · {row.task} · run {row.run_id}"
            grids.append(Image(caption=caption, png=grid.read_bytes()))
    return grids


def write_outputs(tables: Sequence[Table], rows: pd.DataFrame, out: Path, intro: str) -> list[Path]:
    """Write every artifact under out and return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows_csv = out / "rows.csv"
    rows.to_csv(rows_csv, index=False)
    written.append(rows_csv)
    for table in tables:
        for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table))):
            path = out / f"{table.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
        csv_path = out / f"{table.name}.csv"
        to_csv_frame(table).to_csv(csv_path, index=False)
        written.append(csv_path)

    plots: list[Image] = []
    plot_dir = out / "plots"

    def keep(name: str, png: bytes | None, caption: str) -> None:
        if png is None:  # nothing to draw for this selection
            return
        plot_dir.mkdir(exist_ok=True)
        (plot_dir / name).write_bytes(png)
        written.append(plot_dir / name)
        plots.append(Image(caption=caption, png=png))

    for table in tables:
        if not table.name.startswith("shift_and_sum_"):
            continue
        task = table.name.removeprefix("shift_and_sum_")
        for model in dict.fromkeys(group for group, _ in table.values.columns):
            png = bits_curves_png(table.cells, model, f"{model} · {task}")
            keep(f"{task}_{model}.png", png, f"{model}, task {task}: solid = varq, dashed = paper")

    for (model, task, bits), group in rows[rows["bits"] != "fp16"].groupby(["model", "task", "bits"]):
        fp16 = rows[(rows["model"] == model) & (rows["task"] == task) & (rows["quant"] == "fp16")]
        png = qualitative_png(pd.concat([fp16, group]))
        keep(f"qualitative_{task}_{model}_{bits}.png", png, f"{model}, {task}, {bits}: same labels and seeds")

    report = out / "report.html"
    write_report(report, tables, plots, _sample_grids(rows), intro)
    written.append(report)
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m varq.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", nargs="+", type=Path, default=[Path(p) for p in DEFAULT_ROOTS],
                        help="directories searched recursively for row.json (default: runs outputs multirun)")
    parser.add_argument("--out", type=Path, default=Path("results/tables"), help="output directory")
    parser.add_argument("--wandb", nargs="?", const="offline", choices=("offline", "online"),
                        help="also log tables, rows, plots and report.html as one W&B run (default mode: offline)")
    parser.add_argument("--published", type=Path, default=Path("results/published/published.csv"),
                        help="published numbers CSV (missing file: varq rows only)")
    parser.add_argument("--models", nargs="+", help="e.g. var_d16 var_d24")
    parser.add_argument("--methods", nargs="+", help="quant keys, e.g. ours brecq litevar (fp16 always kept)")
    parser.add_argument("--bits", nargs="+", help="e.g. w4a4 w6a6 (the FP16 row is always kept)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric columns")
    parser.add_argument("--tasks", nargs="+", help="e.g. class_cond inpaint")
    parser.add_argument("--deltas", nargs="*", default=["fid"], help="metrics that get a Δ column (none: empty)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    selection = Selection(models=args.models, methods=args.methods, bits=args.bits, tasks=args.tasks,
                          metrics=tuple(args.metrics), deltas=tuple(args.deltas))
    found = dedupe_runs(load_rows(args.root))
    if found.empty:
        log.warning("no row.json under %s", ", ".join(map(str, args.root)))
    rows = select(found, models=args.models, methods=args.methods, bits=args.bits, tasks=args.tasks)
    tables = build_tables(rows, load_published(args.published), selection)
    intro = (f"{len(rows)} runs selected from {len(found)} (after de-duplication by run_id) under "
             f"{', '.join(map(str, args.root))}; published numbers from {args.published}.")
    written = write_outputs(tables, rows, args.out, intro)
    if args.wandb:
        from varq.tracking import log_tables

        log_tables(tables, rows, written, args.out, mode=args.wandb)
    for table in tables:
        if table.name.startswith("shift_and_sum_"):
            print(to_markdown(table))
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
