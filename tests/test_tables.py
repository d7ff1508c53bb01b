"""Tables from result rows: golden markdown, published numbers, dedupe, selection, offline HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from varq.report.published import load_published
from varq.report.rows import collapse_repeats, dedupe_runs, load_rows
from varq.tables import main

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_CSV = REPO / "results" / "published" / "published.csv"

FIXTURE_PUBLISHED = """paper,table,model,method,wa,metric,value,source
shift_and_sum,var_depths,var_d16,fp16,fp16,inception_score,274.8,fixture
shift_and_sum,var_depths,var_d16,fp16,fp16,fid,3.41,fixture
shift_and_sum,var_depths,var_d20,fp16,fp16,fid,2.73,fixture
shift_and_sum,var_depths,var_d16,brecq,w4a4,inception_score,67.6,fixture
shift_and_sum,var_depths,var_d16,brecq,w4a4,fid,33.03,fixture
shift_and_sum,var_depths,var_d16,ours,w4a4,inception_score,90.7,fixture
shift_and_sum,var_depths,var_d16,ours,w4a4,fid,24.57,fixture
shift_and_sum,var_depths,var_d20,ours,w4a4,fid,17.74,fixture
ptq4arvg,var,var_d16,fp16,fp16,fid,3.60,fixture
"""


def write_row(root: Path, run_id: str, **fields: object) -> Path:
    """One row.json in its own run directory, with the contract keys (overridable) plus an unknown extra key."""
    row = {
        "run_id": run_id, "model": "var_d16", "quant": "ours", "bits": "w4a4", "calib": "resample",
        "task": "class_cond", "n_samples": 50000, "seed": 0, "inception_score": None, "fid": None,
        "fid2fp16": None, "class_accuracy": None, "time_build_s": 1.0, "time_calibrate_s": 2.0,
        "time_generate_s": 3.0, "time_metrics_s": 4.0, "git_sha": "0" * 40, "torch_version": "2.4.0",
        "device": "cpu", "dtype": "float16", "created_at": "2026-01-01T00:00:00+00:00",
        "unexpected_extra": {"nested": [1, 2]},
    }
    row.update(fields)
    run_dir = root / f"run_{run_id}_{len(list(root.glob('*')))}"
    run_dir.mkdir(parents=True)
    path = run_dir / "row.json"
    path.write_text(json.dumps(row), encoding="utf-8")
    return path


@pytest.fixture()
def fixture_runs(tmp_path: Path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    write_row(runs, "fp", quant="fp16", bits="fp16", calib="none", inception_score=280.0, fid=3.5)
    write_row(runs, "ours4", inception_score=95.0, fid=23.0, fid2fp16=22.0)
    write_row(runs, "brecq4", quant="brecq", inception_score=70.0, fid=30.5, fid2fp16=30.0)
    write_row(runs, "brecq6", quant="brecq", bits="w6a6", inception_score=200.0, fid=5.25)  # fid2fp16 null
    published = tmp_path / "published.csv"
    published.write_text(FIXTURE_PUBLISHED, encoding="utf-8")
    return runs, published


def run_cli(runs: Path, published: Path, out: Path, *extra: str) -> None:
    assert main(["--root", str(runs), "--out", str(out), "--published", str(published), *extra]) == 0


GOLDEN_MAIN = """\
### Shift-and-Sum layout, task class_cond — paper: Shift-and-Sum (methods.md §6.1)

| W/A | method | source | var_d16 IS | var_d16 FID | var_d16 FID2FP16 | var_d16 ΔFID | var_d20 IS | var_d20 FID | var_d20 FID2FP16 | var_d20 ΔFID |
|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|
| FP16 | fp16 | varq | 280.0 | 3.50 | – | – | – | – | – | – |
|  |  | paper | 274.8 | 3.41 | – | – | – | 2.73 | – | – |
| W6A6 | brecq | varq | 200.0 | 5.25 | – | +1.75 | – | – | – | – |
| W4A4 | brecq | varq | 70.0 | 30.50 | 30.00 | +27.00 | – | – | – | – |
|  |  | paper | 67.6 | 33.03 | – | +29.62 | – | – | – | – |
|  | ours | varq | **95.0** | **23.00** | **22.00** | +19.50 | – | – | – | – |
|  |  | paper | **90.7** | **24.57** | – | +21.16 | – | 17.74 | – | +15.01 |
"""


def test_golden_shift_and_sum_markdown(fixture_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    runs, published = fixture_runs
    out = tmp_path / "out"
    run_cli(runs, published, out)
    markdown = (out / "shift_and_sum_class_cond.md").read_text(encoding="utf-8")
    # Layout, Δ against our own FP16 (varq) / the paper's FP row (paper), bold only within a W/A block and
    # source with >1 candidate (W6A6 brecq alone is not bold), FP16 never bold, missing cells as "–".
    assert markdown.startswith(GOLDEN_MAIN)
    assert GOLDEN_MAIN.splitlines()[4] in capsys.readouterr().out
    for suffix in (".tex", ".csv"):
        assert (out / f"shift_and_sum_class_cond{suffix}").is_file()
    tex = (out / "shift_and_sum_class_cond.tex").read_text(encoding="utf-8")
    assert r"\textbf{23.00}" in tex and r"\multicolumn{4}{c}{var\_d20}" in tex and "$\\Delta$FID" in tex
    wide = pd.read_csv(out / "shift_and_sum_class_cond.csv")
    ours_varq = wide.loc[(wide["bits"] == "w4a4") & (wide["method"] == "ours") & (wide["source"] == "varq")]
    assert ours_varq["var_d16/delta_fid"].item() == pytest.approx(19.5)
    assert ours_varq["var_d20/fid"].isna().item()  # missing stays missing, never invented
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["class_cond_var_d16.png", "class_cond_var_d20.png"]


def test_ptq4arvg_layout_rows_are_models(fixture_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs, published = fixture_runs
    out = tmp_path / "out"
    run_cli(runs, published, out)
    markdown = (out / "ptq4arvg_class_cond.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    # Only the W8A8/W6A6 grid (no W4A4), rows led by the model; metrics without any value (sFID, Prec, Rec,
    # FID2FP16 here) are dropped; the paper's FP row has its own Δ baseline.
    assert table == [
        "| model | W/A | method | source | IS | FID | ΔFID |",
        "|:---|:---|:---|:---|---:|---:|---:|",
        "| var_d16 | FP16 | fp16 | varq | 280.00 | 3.50 | – |",
        "|  |  |  | paper | – | 3.60 | – |",
        "|  | W6A6 | brecq | varq | 200.00 | 5.25 | +1.75 |",
    ]


def test_dedupe_keeps_newest_and_tolerates_bad_files(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "same", fid=10.0, created_at="2026-01-01T00:00:00+00:00")
    write_row(runs, "same", fid=7.0, created_at="2026-03-01T12:00:00+00:00")
    write_row(runs, "same", fid=9.0, created_at="2026-02-01T00:00:00+00:00")
    write_row(runs, "other", fid=1.0, created_at=None)
    (runs / "broken").mkdir()
    (runs / "broken" / "row.json").write_text("{not json", encoding="utf-8")
    (runs / "list").mkdir()
    (runs / "list" / "row.json").write_text("[1, 2]", encoding="utf-8")
    rows = dedupe_runs(load_rows([runs, tmp_path / "absent"]))
    assert sorted(rows["run_id"]) == ["other", "same"]
    assert rows.set_index("run_id").loc["same", "fid"] == 7.0
    assert "unexpected_extra" in rows.columns


def test_repeats_keep_full_protocol_and_average_seeds(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "s0", seed=0, fid=20.0)
    write_row(runs, "s1", seed=1, fid=22.0)
    write_row(runs, "smoke", seed=0, n_samples=100, fid=90.0)
    collapsed = collapse_repeats(load_rows([runs]))
    assert len(collapsed) == 1
    assert collapsed["fid"].item() == pytest.approx(21.0)
    assert collapsed["n_runs"].item() == 2


def test_calibration_variants_get_their_own_lines(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "fp", quant="fp16", bits="fp16", calib="none", fid=3.0)
    write_row(runs, "r", calib="random", fid=30.0)
    write_row(runs, "s", calib="resample", fid=25.0)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    markdown = (out / "shift_and_sum_class_cond.md").read_text(encoding="utf-8")
    assert "| W4A4 | ours (random) | varq | – | 30.00 | – | +27.00 |" in markdown
    assert "|  | ours (resample) | varq | – | **25.00** | – | +22.00 |" in markdown


def test_selection_options(fixture_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs, published = fixture_runs
    write_row(runs, "d24", model="var_d24", fid=12.0)
    write_row(runs, "inpaint", task="inpaint", fid=40.0)
    out = tmp_path / "out"
    run_cli(runs, published, out, "--methods", "ours", "--bits", "w4a4", "--models", "var_d16",
            "--metrics", "fid", "--tasks", "class_cond")
    markdown = (out / "shift_and_sum_class_cond.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0] == "| W/A | method | source | var_d16 FID | var_d16 ΔFID |"
    assert table[2:] == [
        "| FP16 | fp16 | varq | 3.50 | – |",  # FP16 kept despite --methods/--bits: deltas need it
        "|  |  | paper | 3.41 | – |",
        "| W4A4 | ours | varq | 23.00 | +19.50 |",
        "|  |  | paper | 24.57 | +21.16 |",
    ]
    assert not (out / "shift_and_sum_inpaint.md").exists()
    selected = pd.read_csv(out / "rows.csv")
    assert sorted(selected["run_id"]) == ["fp", "ours4"]

    run_cli(runs, published, out, "--tasks", "inpaint", "--deltas")
    inpaint = (out / "shift_and_sum_inpaint.md").read_text(encoding="utf-8")
    assert "no published numbers" in inpaint and "paper" not in inpaint.split("\n\n")[1] and "Δ" not in inpaint.split("\n\n")[1]


def test_html_report_is_self_contained(fixture_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs, published = fixture_runs
    grid_png = b"\x89PNG\r\n\x1a\n" + b"fixture-grid"
    next(runs.rglob("row.json")).with_name("grid.png").write_bytes(grid_png)
    out = tmp_path / "out"
    run_cli(runs, published, out)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report, flags=re.IGNORECASE)
    assert "<link" not in report and "<script" not in report
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    assert len(images) == 3  # two model plots + one sample grid
    assert "<b>23.00</b>" in report and "Sample grids" in report


# --- published numbers -------------------------------------------------------------------------------------

# (paper, table, model, method, wa, metric, value), copied by hand from methods.md §6.
METHODS_MD_VALUES = [
    ("shift_and_sum", "var_depths", "var_d16", "fp16", "fp16", "inception_score", 274.8),
    ("shift_and_sum", "var_depths", "var_d30", "fp16", "fp16", "fid", 1.97),
    ("shift_and_sum", "var_depths", "var_d16", "ours", "w4a4", "fid", 24.57),
    ("shift_and_sum", "var_depths", "var_d16", "brecq", "w6a6", "fid2fp16", 4.29),
    ("shift_and_sum", "var_depths", "var_d24", "ours_litevar", "w4a8", "inception_score", 285.6),
    ("shift_and_sum", "var_depths", "var_d20", "litevar", "w4a6", "fid2fp16", 5.06),
    ("shift_and_sum", "var_depths", "var_d30", "ours_litevar", "w4a4", "fid2fp16", 8.48),
    ("ptq4arvg", "var", "var_d16", "ptq4arvg", "w6a6", "fid", 8.34),
    ("ptq4arvg", "var", "var_d24", "fp16", "fp16", "sfid", 8.24),
    ("ptq4arvg", "var", "var_d24", "repq_star", "w8a8", "precision", 0.76),
    ("ptq4arvg", "var", "var_d16", "smoothquant", "w6a6", "inception_score", 101.55),
    ("ptq4arvg", "rar", "rar_xl", "svdquant", "w6a6", "fid", 5.41),
    ("ptq4arvg", "par", "par_xxl_4x", "smoothquant_stwq", "w6a6", "sfid", 7.73),
    ("ptq4arvg", "par", "par_xl_4x", "fp16", "fp16", "inception_score", 259.2),
    ("ptq4arvg", "mar", "mar_h", "ptq4arvg", "w6a6", "precision", 0.75),
    ("ptq4arvg", "speedup", "var_d20", "ptq4arvg", "w6a6", "latency_ms_seq64", 167.0),
    ("ptq4arvg", "speedup", "rar_l", "fp16", "fp16", "memory_mb_seq256", 4241.0),
    ("fpqvar", "var_d30", "var_d30", "litevar", "w4a4", "fid", 10.83),
    ("fpqvar", "var_d30", "var_d30", "fpqvar_kv6", "fp6", "inception_score", 296.8),
    ("fpqvar", "var_d30", "var_d30", "rtn", "w6a6", "recall", 0.63),
    ("litevar", "abstract", "var", "litevar", "unspecified", "fid_increase_max", 0.056),
]

# Numeric cells per table in methods.md §6 ("–" cells excluded).
METHODS_MD_COUNTS = {
    ("shift_and_sum", "var_depths"): 8 + 16 * 12, ("ptq4arvg", "var"): 15 * 8, ("ptq4arvg", "rar"): 15 * 8,
    ("ptq4arvg", "par"): 6 + 14 * 8, ("ptq4arvg", "mar"): 9 * 9, ("ptq4arvg", "speedup"): 6 * 4,
    ("fpqvar", "var_d30"): 13 * 4, ("litevar", "abstract"): 4,
}


def test_published_csv_matches_methods_md() -> None:
    published = load_published(PUBLISHED_CSV)
    assert list(published.columns) == ["paper", "table", "model", "method", "wa", "metric", "value", "source"]
    keys = ["paper", "table", "model", "method", "wa", "metric"]
    assert not published.duplicated(keys).any()
    indexed = published.set_index(keys)["value"]
    for *key, value in METHODS_MD_VALUES:
        assert indexed.loc[tuple(key)] == pytest.approx(value), key
    assert published.groupby(["paper", "table"]).size().to_dict() == METHODS_MD_COUNTS
    # "–" in the source is absent here, not zero: Shift-and-Sum has no FID2FP16 for its FP row.
    fp_rows = published.loc[(published["paper"] == "shift_and_sum") & (published["wa"] == "fp16")]
    assert set(fp_rows["metric"]) == {"inception_score", "fid"}
    assert published["wa"].str.fullmatch(r"fp16|fp6|fp4|w\d+a\d+|unspecified").all()
    assert published["source"].str.contains("methods.md §6").all()
