"""Result rows → paper-style comparison tables next to the published numbers.

    python -m varq.tables --root runs --out results/tables [--models var_d16 var_d24] [--methods ours brecq]
        [--bits w4a4 w6a6] [--metrics inception_score fid fid2fp16] [--tasks class_cond] [--deltas fid]
        [--protocols legacy:1a2b] [--published results/published/published.csv]
    python -m varq.tables --root runs --compare ours brecq     # paired verdicts for every bit-width

Rows are never merged across protocols (model identity, task, samples, cfg, top-k/top-p, dtype): every
protocol × task gets its own tables, one per model, and rows kept apart are reported. Inside a table a cell
averages the runs that differ only in calibration and eval seeds (mean ± std and a 95 % bootstrap CI), shows n
and the number of runs, and Δ is taken against the FP16 row of the same protocol. Writes, per protocol, the
Shift-and-Sum layout (rows = W/A × method × source, columns = metrics) and the PTQ4ARVG layout (W8A8/W6A6 grid)
as markdown, LaTeX and CSV; FID and FID2FP16 against bit-width plots with error bars and the qualitative figures
(PNG); ``rows.csv`` with the selected runs; ``cells.csv`` with every cell's statistics; and a self-contained
``report.html``. The Shift-and-Sum markdown is also printed.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from varq.atomic import atomic_write_bytes, write_text_atomic
from varq.report.compare import compare_methods, significant_marks
from varq.report.html import Image, write_report
from varq.report.layout import Table, build_table, paper_cells, varq_cells
from varq.report.plots import bits_curves_png
from varq.report.published import PTQ4ARVG_VAR, SHIFT_AND_SUM_VAR, load_published, paper_table, source_notes
from varq.report.qualitative import qualitative_png
from varq.report.render import NOTE_SPREAD, to_csv_frame, to_latex, to_markdown
from varq.report.rows import (
    PATH_COLUMN,
    aggregate_cells,
    dedupe_runs,
    describe_protocol,
    load_rows,
    protocol_fields,
    select,
    warn_kept_apart,
)
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
NOTE_DELTA = ("Δ: difference to the FP16 row of the same source — varq rows against our own FP16 runs of the same "
              "protocol, paper rows against that paper's FP row — so degradation is compared across differing FP "
              "baselines.")


@dataclass(frozen=True)
class Selection:
    """What the user asked to see (None = everything)."""

    models: Sequence[str] | None = None
    methods: Sequence[str] | None = None
    bits: Sequence[str] | None = None
    tasks: Sequence[str] | None = None
    metrics: Sequence[str] = DEFAULT_METRICS
    deltas: Sequence[str] = ("fid",)


@dataclass(frozen=True)
class Unit:
    """What one table set covers: a task, a model and one protocol (None for paper-only tables)."""

    task: str
    model: str
    protocol: str | None
    stem: str          # file-name part, e.g. "class_cond_var_digits" (+ "_<protocol>" when a model has several)
    description: str   # e.g. "n=1000, cfg 1.5, top-k 0, top-p 0.96, fp32"


def _select_published(paper: pd.DataFrame, selection: Selection, model: str) -> pd.DataFrame:
    """Same filters as for our rows, for one model; the FP row is always kept because deltas need it."""
    mask = paper["model"].eq(model)
    is_fp = paper["bits"].eq(FP_BITS)
    if selection.methods:
        mask &= paper["quant"].isin(selection.methods) | is_fp
    if selection.bits:
        mask &= paper["bits"].isin(selection.bits) | is_fp
    return paper.loc[mask]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def table_units(cells: pd.DataFrame, rows: pd.DataFrame, published: pd.DataFrame, selection: Selection) -> list[Unit]:
    """One unit per (task, model, protocol) with rows, plus paper-only units for published models without rows
    (so a fresh checkout still shows the paper tables with the varq lines to fill)."""
    units: list[Unit] = []
    fields = protocol_fields(rows) if not rows.empty else None
    for (task, model), block in cells.groupby(["task", "model"], sort=True):
        protocols = list(dict.fromkeys(block["protocol_id"]))
        for protocol in protocols:
            suffix = f"_{_slug(protocol)}" if len(protocols) > 1 else ""
            description = f"{describe_protocol(fields.loc[protocol])}, protocol {protocol}"
            units.append(Unit(str(task), str(model), protocol, f"{task}_{model}{suffix}", description))
    paper_wanted = not published.empty and (not selection.tasks or PAPER_TASK in selection.tasks)
    if paper_wanted:
        covered = {u.model for u in units if u.task == PAPER_TASK}
        paper_models = paper_table(published, SHIFT_AND_SUM_VAR)["model"].dropna().unique()
        for model in sorted(set(paper_models) - covered):
            if not selection.models or model in selection.models:
                units.append(Unit(PAPER_TASK, str(model), None, f"{PAPER_TASK}_{model}", "no varq runs"))
    return units


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate long cell frames, skipping empty ones (pandas warns about all-NA columns otherwise)."""
    present = [frame for frame in frames if not frame.empty]
    return pd.concat(present, ignore_index=True) if present else frames[0]


def build_tables(rows: pd.DataFrame, published: pd.DataFrame, selection: Selection) -> list[Table]:
    """Both layouts for every (task, model, protocol) of the (already selected, deduplicated) rows."""
    cells = aggregate_cells(rows)
    tables: list[Table] = []
    for unit in table_units(cells, rows, published, selection):
        ours = cells.loc[cells["protocol_id"].eq(unit.protocol) & cells["task"].eq(unit.task)] \
            if unit.protocol is not None else cells.iloc[0:0]
        with_paper = unit.task == PAPER_TASK and not published.empty
        main_metrics = list(selection.metrics)
        marks = significant_marks(rows, ours, main_metrics)
        main_cells = [varq_cells(ours, main_metrics, marks)]
        paper_rows = pd.DataFrame(columns=["source", "caveat", "quant", "metric"])
        if with_paper:
            paper_rows = _select_published(paper_table(published, SHIFT_AND_SUM_VAR), selection, unit.model)
            paper_rows = paper_rows.loc[paper_rows["metric"].isin(main_metrics)]
            main_cells.append(paper_cells(paper_rows, main_metrics))
        long = _concat(main_cells)
        if long.empty:
            continue
        source = " — paper: Shift-and-Sum (methods.md §6.1)" if not paper_rows.empty else " — no published numbers"
        tables.append(build_table(
            long, name=f"shift_and_sum_{unit.stem}",
            title=f"Shift-and-Sum layout, {unit.model}, task {unit.task} ({unit.description}){source}",
            row_levels=("bits", "method", "source"), group_by_model=True, metrics=main_metrics,
            delta_metrics=selection.deltas, block_levels=("bits",), decimals=DECIMALS,
            notes=(NOTE_MARKS, NOTE_DELTA, NOTE_SPREAD, *source_notes(paper_rows)),
        ))

        wide_metrics = list(dict.fromkeys([*PTQ4ARVG_METRICS, *selection.metrics]))
        grid_marks = significant_marks(rows, ours, wide_metrics)
        grid_cells = [varq_cells(ours, wide_metrics, grid_marks)]
        grid_paper = pd.DataFrame(columns=["source", "caveat", "quant", "metric"])
        if with_paper:
            grid_paper = _select_published(paper_table(published, PTQ4ARVG_VAR), selection, unit.model)
            grid_paper = grid_paper.loc[grid_paper["metric"].isin(wide_metrics) & grid_paper["bits"].isin(PTQ4ARVG_BITS)]
            grid_cells.append(paper_cells(grid_paper, wide_metrics))
        long = _concat(grid_cells)
        long = long.loc[long["bits"].isin(PTQ4ARVG_BITS)]
        if long["bits"].ne(FP_BITS).any():
            source = " — paper: PTQ4ARVG (methods.md §6.2)" if not grid_paper.empty else " — no published numbers"
            tables.append(build_table(
                long, name=f"ptq4arvg_{unit.stem}",
                title=f"PTQ4ARVG layout, {unit.model}, task {unit.task} ({unit.description}){source}",
                row_levels=("model", "bits", "method", "source"), group_by_model=False, metrics=wide_metrics,
                delta_metrics=selection.deltas, block_levels=("model", "bits"),
                decimals={**DECIMALS, "inception_score": 2},
                notes=(NOTE_MARKS, NOTE_DELTA, NOTE_SPREAD, *source_notes(grid_paper)), drop_empty_metrics=True,
            ))
    return tables


def _sample_grids(rows: pd.DataFrame) -> list[Image]:
    """``grid.png`` files saved next to a selected row, captioned with the run they belong to."""
    grids: list[Image] = []
    for row in rows.itertuples(index=False):
        grid = Path(getattr(row, PATH_COLUMN)).with_name("grid.png")
        if grid.is_file():
            caption = (f"{row.model} · {row.quant} · {row.bits} · calib {row.calib} · {row.task} · n {row.n_samples}"
                       f" · seed {row.seed} · run {row.run_id}")
            grids.append(Image(caption=caption, png=grid.read_bytes()))
    return grids


def write_outputs(tables: Sequence[Table], rows: pd.DataFrame, out: Path, intro: str) -> list[Path]:
    """Write every artifact under out and return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, frame in (("rows.csv", rows), ("cells.csv", aggregate_cells(rows))):
        write_text_atomic(out / name, frame.to_csv(index=False))
        written.append(out / name)
    for table in tables:
        for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table))):
            path = out / f"{table.name}{suffix}"
            write_text_atomic(path, text)
            written.append(path)
        csv_path = out / f"{table.name}.csv"
        write_text_atomic(csv_path, to_csv_frame(table).to_csv(index=False))
        written.append(csv_path)

    plots: list[Image] = []
    plot_dir = out / "plots"

    def keep(name: str, png: bytes | None, caption: str) -> None:
        if png is None:  # nothing to draw for this selection
            return
        plot_dir.mkdir(exist_ok=True)
        atomic_write_bytes(plot_dir / name, png)
        written.append(plot_dir / name)
        plots.append(Image(caption=caption, png=png))

    for table in tables:
        if not table.name.startswith("shift_and_sum_"):
            continue
        stem = table.name.removeprefix("shift_and_sum_")
        for model in dict.fromkeys(group for group, _ in table.values.columns):
            # the protocol goes on a second line so that the title fits the figure's width
            title = table.title.removeprefix("Shift-and-Sum layout, ").replace(" (", "\n(", 1)
            png = bits_curves_png(table.cells, model, title)
            keep(f"{stem}.png", png, f"{table.title}: solid = varq (error bars: 95 % CI over seeds), dashed = paper")

    if not rows.empty:
        for (protocol, task, bits), group in rows[rows["bits"] != FP_BITS].groupby(["protocol_id", "task", "bits"]):
            same = rows["protocol_id"].eq(protocol) & rows["task"].eq(task)
            fp16 = rows.loc[same & rows["quant"].eq("fp16")]
            model = str(group["model"].iloc[0])
            n_protocols = rows.loc[rows["model"].eq(model) & rows["task"].eq(task), "protocol_id"].nunique()
            suffix = f"_{_slug(protocol)}" if n_protocols > 1 else ""
            png = qualitative_png(pd.concat([fp16, group]))
            keep(f"qualitative_{task}_{model}{suffix}_{bits}.png", png,
                 f"{model}, {task}, {bits}, protocol {protocol}: one FP16 row, same labels and seeds for every method")

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
    parser.add_argument("--protocols", nargs="+", help="protocol_id prefixes to keep (see the kept-apart warnings)")
    parser.add_argument("--deltas", nargs="*", default=["fid"], help="metrics that get a Δ column (none: empty)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="print paired verdicts (A vs B over matched seeds) for every bit-width; writes nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    selection = Selection(models=args.models, methods=args.methods, bits=args.bits, tasks=args.tasks,
                          metrics=tuple(args.metrics), deltas=tuple(args.deltas))
    found = dedupe_runs(load_rows(args.root))
    if found.empty:
        log.warning("no row.json under %s", ", ".join(map(str, args.root)))
    rows = select(found, models=args.models, methods=args.methods, bits=args.bits, tasks=args.tasks,
                  protocols=args.protocols)
    warn_kept_apart(rows)
    if args.compare:
        a, b = args.compare
        verdicts = compare_methods(rows, a, b, args.metrics)
        for verdict in verdicts:
            print(verdict.line(a, b))
        if not verdicts:
            print(f"no bit-width where both {a} and {b} have runs under {', '.join(map(str, args.root))}")
        return 0
    tables = build_tables(rows, load_published(args.published), selection)
    n_protocols = rows["protocol_id"].nunique() if not rows.empty else 0
    intro = (f"{len(rows)} runs selected from {len(found)} (after de-duplication by run_id) under "
             f"{', '.join(map(str, args.root))}, in {n_protocols} protocol(s), each tabulated on its own; "
             f"published numbers from {args.published}.")
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
