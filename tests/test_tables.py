"""Tables from result rows: protocol-safe grouping, seed statistics, golden markdown, published numbers, HTML."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from varq.report.published import load_published
from varq.report.rows import aggregate_cells, dedupe_runs, load_rows
from varq.tables import main

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_CSV = REPO / "results" / "published" / "published.csv"

FIXTURE_PUBLISHED = """paper,table,model,method,wa,metric,value,source,caveat
shift_and_sum,var_depths,var_d16,fp16,fp16,inception_score,274.8,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d16,fp16,fp16,fid,3.41,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d20,fp16,fp16,fid,2.73,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d16,brecq,w4a4,inception_score,67.6,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d16,brecq,w4a4,fid,33.03,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d16,litevar,w4a4,fid,28.00,fixture paper fig 1,transcribed from a figure; LiteVAR as re-implemented by Shift-and-Sum
shift_and_sum,var_depths,var_d16,ours,w4a4,inception_score,90.7,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d16,ours,w4a4,fid,24.57,fixture paper fig 1,transcribed from a figure
shift_and_sum,var_depths,var_d20,ours,w4a4,fid,17.74,fixture paper fig 1,transcribed from a figure
ptq4arvg,var,var_d16,fp16,fp16,fid,3.60,fixture ptq4arvg fig,transcribed from a figure
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


def new_row(root: Path, run_id: str, **fields: object) -> Path:
    """A row with the identity fields of the current writer (protocol/quant/calib ids, seeds, bit numbers)."""
    quant = fields.get("quant", "ours")
    bits = fields.get("bits", "w4a4")
    w, a = (None, None) if quant == "fp16" else (int(bits[1:].split("a")[0]), int(bits.split("a")[1]))
    defaults = {"protocol_id": "p-full", "quant_id": f"q-{quant}", "calib_id": "none" if quant == "fp16" else "c-1",
                "calib_seed": None if quant == "fp16" else 0, "w_bits": w, "a_bits": a,
                "calib": "none" if quant == "fp16" else "resample"}
    return write_row(root, run_id, **{**defaults, **fields})


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


def table_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]


GOLDEN_MAIN = """\
| W/A | method | source | var_d16 IS | var_d16 FID | var_d16 FID2FP16 | var_d16 ΔFID | var_d16 n | var_d16 runs |
|:---|:---|:---|---:|---:|---:|---:|---:|---:|
| FP16 | fp16 | varq | 280.0 | 3.50 | – | – | 50000 | 1 |
|  |  | paper | 274.8 | 3.41 | – | – | – | – |
| W6A6 | brecq | varq | 200.0 | 5.25 | – | +1.75 | 50000 | 1 |
| W4A4 | brecq | varq | 70.0 | 30.50 | 30.00 | +27.00 | 50000 | 1 |
|  |  | paper | 67.6 | 33.03 | – | +29.62 | – | – |
|  | litevar‡ | paper | – | 28.00 | – | +24.59 | – | – |
|  | ours | varq | **95.0** | **23.00** | **22.00** | +19.50 | 50000 | 1 |
|  |  | paper | **90.7** | **24.57** | – | +21.16 | – | – |
"""


def test_golden_shift_and_sum_markdown(fixture_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    runs, published = fixture_runs
    out = tmp_path / "out"
    run_cli(runs, published, out)
    markdown = (out / "shift_and_sum_class_cond_var_d16.md").read_text(encoding="utf-8")
    # Layout, Δ against our own FP16 (varq) / the paper's FP row (paper), bold only within a W/A block and
    # source with >1 candidate (W6A6 brecq alone is not bold), FP16 never bold, missing cells as "–", n and runs.
    assert "\n".join(table_lines(out / "shift_and_sum_class_cond_var_d16.md")) + "\n" == GOLDEN_MAIN
    assert markdown.startswith("### Shift-and-Sum layout, var_d16, task class_cond (n=50000")
    assert GOLDEN_MAIN.splitlines()[4] in capsys.readouterr().out
    for suffix in (".tex", ".csv"):
        assert (out / f"shift_and_sum_class_cond_var_d16{suffix}").is_file()
    tex = (out / "shift_and_sum_class_cond_var_d16.tex").read_text(encoding="utf-8")
    assert r"\textbf{23.00}" in tex and r"\multicolumn{6}{c}{var\_d16}" in tex and "$\\Delta$FID" in tex
    wide = pd.read_csv(out / "shift_and_sum_class_cond_var_d16.csv")
    ours_varq = wide.loc[(wide["bits"] == "w4a4") & (wide["method"] == "ours") & (wide["source"] == "varq")]
    assert ours_varq["var_d16/delta_fid"].item() == pytest.approx(19.5)
    assert ours_varq["var_d16/runs"].item() == 1 and ours_varq["var_d16/n"].item() == 50000
    # var_d20 has paper numbers but no runs: its own table, paper rows only (never a column next to var_d16).
    d20 = table_lines(out / "shift_and_sum_class_cond_var_d20.md")
    assert d20[2:] == ["| FP16 | fp16 | paper | – | 2.73 | – | – | – | – |",
                       "| W4A4 | ours | paper | – | 17.74 | – | +15.01 | – | – |"]
    assert sorted(p.name for p in (out / "plots").glob("class_cond_*.png")) == [
        "class_cond_var_d16.png", "class_cond_var_d20.png"]


def test_ptq4arvg_layout_rows_are_models(fixture_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs, published = fixture_runs
    out = tmp_path / "out"
    run_cli(runs, published, out)
    # Only the W8A8/W6A6 grid (no W4A4), rows led by the model; metrics without any value (sFID, Prec, Rec,
    # FID2FP16 here) are dropped; the paper's FP row has its own Δ baseline.
    assert table_lines(out / "ptq4arvg_class_cond_var_d16.md") == [
        "| model | W/A | method | source | IS | FID | ΔFID | n | runs |",
        "|:---|:---|:---|:---|---:|---:|---:|---:|---:|",
        "| var_d16 | FP16 | fp16 | varq | 280.00 | 3.50 | – | 50000 | 1 |",
        "|  |  |  | paper | – | 3.60 | – | – | – |",
        "|  | W6A6 | brecq | varq | 200.00 | 5.25 | +1.75 | 50000 | 1 |",
    ]


def test_published_rows_name_source_and_caveats_everywhere(fixture_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs, published = fixture_runs
    out = tmp_path / "out"
    run_cli(runs, published, out)
    markdown = (out / "shift_and_sum_class_cond_var_d16.md").read_text(encoding="utf-8")
    tex = (out / "shift_and_sum_class_cond_var_d16.tex").read_text(encoding="utf-8")
    report = (out / "report.html").read_text(encoding="utf-8")
    for text in (markdown, tex, report):
        assert "Paper rows: fixture paper fig 1." in text
        assert "Caveats: transcribed from a figure." in text
        assert "(litevar): LiteVAR as re-implemented by Shift-and-Sum." in text
    assert "‡ (litevar)" in markdown and r"$^\ddagger$ (litevar)" in tex and "litevar‡" in report


def test_binary_and_malformed_rows_are_skipped_with_their_path(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "fp", quant="fp16", bits="fp16", calib="none", fid=3.0)
    write_row(runs, "ok", fid=20.0)
    binary = runs / "binary" / "row.json"
    binary.parent.mkdir()
    binary.write_bytes(b"\x80\x04\x95\xff\x00PK\x03\x04" + bytes(range(256)))
    truncated = runs / "truncated" / "row.json"
    truncated.parent.mkdir()
    truncated.write_text('{"run_id": "t", "model": "var_d16", "fid": 1', encoding="utf-8")
    typed = write_row(runs, "typed", model=16)  # key with the wrong type
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    for path in (binary, truncated, typed):
        assert any(str(path) in record.getMessage() for record in caplog.records), path
    assert sorted(pd.read_csv(out / "rows.csv")["run_id"]) == ["fp", "ok"]
    assert (out / "shift_and_sum_class_cond_var_d16.md").is_file()


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


def test_mixed_protocols_get_separate_tables_and_their_own_fp16(tmp_path: Path, caplog) -> None:
    """Legacy rows (no protocol_id): 100- and 1000-sample runs of one model, each with its FP16 row."""
    runs = tmp_path / "runs"
    write_row(runs, "fp1000", model="var_digits", quant="fp16", bits="fp16", calib="none", n_samples=1000, fid=40.0)
    write_row(runs, "fp100", model="var_digits", quant="fp16", bits="fp16", calib="none", n_samples=100, fid=90.0)
    write_row(runs, "rtn1000", model="var_digits", quant="rtn", calib="none", n_samples=1000, fid=60.0)
    for seed, fid in ((0, 100.0), (1, 104.0), (2, 108.0)):
        write_row(runs, f"rtn100_{seed}", model="var_digits", quant="rtn", calib="none", n_samples=100, seed=seed,
                  fid=fid)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    # 3 rtn runs + their FP16 row
    assert any(re.search(r"4 rows of var_digits/class_cond with n_samples=100 kept apart from n_samples=1000 \(2 rows\)",
                         r.getMessage()) for r in caplog.records)
    tables = sorted(out.glob("shift_and_sum_class_cond_var_digits_*.md"))
    assert len(tables) == 2
    by_n = {}
    for path in tables:
        lines = table_lines(path)
        by_n[lines[2].split("|")[-3].strip()] = lines
    # ΔFID against the FP16 row of the same protocol: 60 − 40, and mean(100, 104, 108) − 90.
    assert by_n["1000"][3] == "| W4A4 | rtn | varq | – | 60.00 | – | +20.00 | 1000 | 1 |"
    assert by_n["100"][2] == "| FP16 | fp16 | varq | – | 90.00 | – | – | 100 | 1 |"
    assert by_n["100"][3] == "| W4A4 | rtn | varq | – | 104.00 ± 4.00 [100.00, 108.00] | – | +14.00 | 100 | 3 |"


def test_legacy_and_recorded_protocols_are_never_merged(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "old", fid=20.0)
    new_row(runs, "new", fid=30.0)
    new_row(runs, "new_other_quant_id", quant_id="q-ours-no-shift", fid=40.0)
    cells = aggregate_cells(load_rows([runs]))
    assert len(cells) == 3 and sorted(cells["fid"]) == [20.0, 30.0, 40.0]
    assert cells.set_index("fid").loc[20.0, "protocol_id"].startswith("legacy:")
    assert cells.set_index("fid").loc[20.0, "quant_id"] == "unknown"


def test_mislabeled_bits_are_refused(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    new_row(runs, "fp", quant="fp16", bits="fp16", fid=3.0)
    good = new_row(runs, "w4a4", quant="rtn", fid=20.0)
    w3a3 = new_row(runs, "w3a3", quant="rtn", w_bits=3, a_bits=3, fid=80.0)
    w16a4 = new_row(runs, "w16a4", quant="rtn", w_bits=16, a_bits=4, fid=50.0)
    bad_fp = new_row(runs, "fp_bad", quant="fp16", bits="fp16", w_bits=8, a_bits=8, fid=4.0)
    new_row(runs, "fp_w16", quant="fp16", bits="fp16", w_bits=16, a_bits=None, fid=3.0)  # also a valid FP row
    with caplog.at_level(logging.WARNING):
        rows = load_rows([runs])
    assert sorted(rows["run_id"]) == ["fp", "fp_w16", "w4a4"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    for path in (w3a3, w16a4, bad_fp):
        assert str(path) in messages
    assert "expected 'w3a3'" in messages and "expected 'w16a4'" in messages
    assert str(good) not in messages
    cells = aggregate_cells(rows)
    assert cells.set_index("quant").loc["rtn", "fid"] == 20.0  # the W3A3/W16A4 numbers never reach the cell


def test_two_fp16_rows_of_different_protocols(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    new_row(runs, "fpA", quant="fp16", bits="fp16", protocol_id="pA", fid=3.0)
    new_row(runs, "fpB", quant="fp16", bits="fp16", protocol_id="pB", n_samples=1000, fid=9.0)
    new_row(runs, "qA", protocol_id="pA", fid=13.0)
    new_row(runs, "qB", protocol_id="pB", n_samples=1000, fid=14.0)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    a = table_lines(out / "shift_and_sum_class_cond_var_d16_pA.md")
    b = table_lines(out / "shift_and_sum_class_cond_var_d16_pB.md")
    assert [line.split("|")[2].strip() for line in a[2:]].count("fp16") == 1
    assert a[3] == "| W4A4 | ours | varq | – | 13.00 | – | +10.00 | 50000 | 1 |"
    assert b[3] == "| W4A4 | ours | varq | – | 14.00 | – | +5.00 | 1000 | 1 |"


def test_seed_repeats_show_mean_std_and_bootstrap_ci(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    new_row(runs, "fp0", quant="fp16", bits="fp16", seed=0, fid=3.0)
    new_row(runs, "fp1", quant="fp16", bits="fp16", seed=1, fid=5.0)
    for calib_seed, fid in enumerate((20.0, 22.0)):
        new_row(runs, f"o{calib_seed}", calib_seed=calib_seed, fid=fid)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    lines = table_lines(out / "shift_and_sum_class_cond_var_d16.md")
    # std of {20, 22} = √2; the bootstrap CI of two values spans them; Δ = mean 21 − FP16 mean over eval seeds 4.
    assert lines[2] == "| FP16 | fp16 | varq | – | 4.00 ± 1.41 [3.00, 5.00] | – | – | 50000 | 2 |"
    assert lines[3] == "| W4A4 | ours | varq | – | 21.00 ± 1.41 [20.00, 22.00] | – | +17.00 | 50000 | 2 |"
    tex = (out / "shift_and_sum_class_cond_var_d16.tex").read_text(encoding="utf-8")
    assert r"21.00{\scriptsize$\pm$1.41} {\tiny[20.00, 22.00]}" in tex
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "21.00 ± 1.41 <small>[20.00, 22.00]</small>" in html
    wide = pd.read_csv(out / "shift_and_sum_class_cond_var_d16.csv")
    ours = wide.loc[wide["method"] == "ours"].iloc[0]
    assert ours["var_d16/fid_std"] == pytest.approx(2 ** 0.5)
    assert (ours["var_d16/fid_ci_low"], ours["var_d16/fid_ci_high"]) == (20.0, 22.0)
    cells = pd.read_csv(out / "cells.csv")
    assert cells.set_index("quant").loc["ours", "calib_seeds"] == "0,1"


def paired_runs(root: Path, n_seeds: int) -> None:
    """ours beats brecq by ≈2 FID on every calibration seed, though both vary by ±3 across seeds."""
    new_row(root, "fp", quant="fp16", bits="fp16", fid=3.0)
    for k in range(n_seeds):
        base = 20.0 + 3.0 * ((-1) ** k) + 0.1 * k
        new_row(root, f"o{k}", calib_seed=k, fid=base - 2.0 + 0.05 * (k % 3))
        new_row(root, f"b{k}", quant="brecq", calib_seed=k, fid=base)
        new_row(root, f"r{k}", quant="rtn", calib_seed=k, fid=base + 30.0)


def test_significance_marker_and_compare_cli(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    paired_runs(runs, 8)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    lines = table_lines(out / "shift_and_sum_class_cond_var_d16.md")
    ours = next(line for line in lines if "| ours |" in line)
    assert "**" in ours and "†" in ours  # best and significantly better than brecq (p = 2/256)
    assert "†" not in next(line for line in lines if "| brecq |" in line)
    capsys.readouterr()
    assert main(["--root", str(runs), "--compare", "ours", "brecq", "--metrics", "fid"]) == 0
    printed = capsys.readouterr().out
    assert "W4A4 FID: ours − brecq = " in printed and "over 8 pairs" in printed and "→ ours better" in printed


def test_five_paired_seeds_are_not_enough_for_a_marker(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    paired_runs(runs, 5)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    ours = next(line for line in table_lines(out / "shift_and_sum_class_cond_var_d16.md") if "| ours |" in line)
    assert "**" in ours and "†" not in ours  # the exact sign-flip test cannot go below 2/32 with 5 pairs
    capsys.readouterr()
    assert main(["--root", str(runs), "--compare", "ours", "brecq", "--metrics", "fid"]) == 0
    assert "p = 0.0625 → no significant difference" in capsys.readouterr().out


def test_latex_comes_one_table_per_model(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for model in ("var_d16", "var_d20", "var_d24"):
        new_row(runs, f"fp_{model}", model=model, quant="fp16", bits="fp16", protocol_id=f"p-{model}", fid=3.0)
        new_row(runs, f"q_{model}", model=model, protocol_id=f"p-{model}", fid=20.0)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(PUBLISHED_CSV)]) == 0
    texs = sorted(out.glob("shift_and_sum_class_cond_*.tex"))
    assert [p.stem.removeprefix("shift_and_sum_class_cond_") for p in texs] == [
        "var_d16", "var_d20", "var_d24", "var_d30"]
    for path in texs:
        tex = path.read_text(encoding="utf-8")
        assert tex.count(r"\begin{table}") == 1
        groups = re.findall(r"\\multicolumn\{\d+\}\{c\}\{([^}]*)\}", tex)
        assert groups == [path.stem.removeprefix("shift_and_sum_class_cond_").replace("_", r"\_")]


def test_calibration_variants_get_their_own_lines(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "fp", quant="fp16", bits="fp16", calib="none", fid=3.0)
    write_row(runs, "r", calib="random", fid=30.0)
    write_row(runs, "s", calib="resample", fid=25.0)
    out = tmp_path / "out"
    assert main(["--root", str(runs), "--out", str(out), "--published", str(tmp_path / "none.csv")]) == 0
    markdown = (out / "shift_and_sum_class_cond_var_d16.md").read_text(encoding="utf-8")
    assert "| W4A4 | ours (random) | varq | – | 30.00 | – | +27.00 | 50000 | 1 |" in markdown
    assert "|  | ours (resample) | varq | – | **25.00** | – | +22.00 | 50000 | 1 |" in markdown


def test_selection_options(fixture_runs: tuple[Path, Path], tmp_path: Path, caplog) -> None:
    runs, published = fixture_runs
    write_row(runs, "d24", model="var_d24", fid=12.0)
    write_row(runs, "inpaint", task="inpaint", fid=40.0)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        run_cli(runs, published, out, "--methods", "ours", "--bits", "w4a4", "--models", "var_d16",
                "--metrics", "fid", "--tasks", "class_cond")
    assert any("--models dropped 1 rows (1 of var_d24/class_cond)" in r.getMessage() for r in caplog.records)
    table = table_lines(out / "shift_and_sum_class_cond_var_d16.md")
    assert table[0] == "| W/A | method | source | var_d16 FID | var_d16 ΔFID | var_d16 n | var_d16 runs |"
    assert table[2:] == [
        "| FP16 | fp16 | varq | 3.50 | – | 50000 | 1 |",  # FP16 kept despite --methods/--bits: deltas need it
        "|  |  | paper | 3.41 | – | – | – |",
        "| W4A4 | ours | varq | 23.00 | +19.50 | 50000 | 1 |",
        "|  |  | paper | 24.57 | +21.16 | – | – |",
    ]
    assert not list(out.glob("shift_and_sum_inpaint*.md")) and not list(out.glob("*var_d20*"))
    selected = pd.read_csv(out / "rows.csv")
    assert sorted(selected["run_id"]) == ["fp", "ours4"]

    run_cli(runs, published, out, "--tasks", "inpaint", "--deltas")
    inpaint = (out / "shift_and_sum_inpaint_var_d16.md").read_text(encoding="utf-8")
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
    assert len(images) == 3  # two model plots (d16 with runs, d20 paper only) + one sample grid
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
    assert list(published.columns) == ["paper", "table", "model", "method", "wa", "metric", "value", "source",
                                       "caveat"]
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
    # Every row says how it was obtained; Shift-and-Sum's LiteVAR rows say whose implementation they are.
    assert published["caveat"].str.len().gt(0).all()
    sas_litevar = published.loc[(published["paper"] == "shift_and_sum") & (published["method"] == "litevar")]
    assert sas_litevar["caveat"].str.contains("LiteVAR as re-implemented by Shift-and-Sum").all()
    assert published.loc[published["paper"] != "litevar", "caveat"].str.contains("transcribed from a figure").all()


def test_plots_draw_the_ci_as_error_bars(tmp_path: Path) -> None:
    from matplotlib.container import ErrorbarContainer

    from varq.report.plots import bits_curves_figure
    from varq.tables import Selection, build_tables

    runs = tmp_path / "runs"
    new_row(runs, "fp", quant="fp16", bits="fp16", fid=3.0)
    for calib_seed, fid in enumerate((20.0, 22.0)):
        new_row(runs, f"o{calib_seed}", calib_seed=calib_seed, fid=fid)
    new_row(runs, "b", quant="brecq", fid=30.0)  # a single run: no bar
    tables = build_tables(load_rows([runs]), load_published(None), Selection(metrics=("fid",)))
    figure = bits_curves_figure(tables[0].cells, "var_d16", "t", metrics=("fid",))
    bars = {c.get_label(): c for c in figure.axes[0].containers if isinstance(c, ErrorbarContainer)}
    ours = bars["ours (varq, 2 runs)"].lines[2][0].get_segments()  # one vertical segment per point
    assert [(seg[0][1], seg[1][1]) for seg in ours] == [(20.0, 22.0)]  # the bootstrap CI of {20, 22}
    brecq = bars["brecq (varq, 1 run)"].lines[2][0].get_segments()
    assert [(seg[0][1], seg[1][1]) for seg in brecq] == [(30.0, 30.0)]


def test_pairing_matches_seeds_and_broadcasts_a_method_without_calibration() -> None:
    from varq.report.compare import paired_values

    a = pd.DataFrame({"seed": [0, 0, 0, 1], "calib_seed": [0, 1, 2, 0], "fid": [10.0, 11.0, 12.0, 13.0]})
    b = pd.DataFrame({"seed": [1, 0], "calib_seed": [None, None], "fid": [30.0, 20.0]})
    x, y = paired_values(a, b, "fid")  # rtn-like B: one run per eval seed serves every calibration seed of A
    assert sorted(zip(x.tolist(), y.tolist())) == [(10.0, 20.0), (11.0, 20.0), (12.0, 20.0), (13.0, 30.0)]
    x2, y2 = paired_values(b, a, "fid")
    assert sorted(zip(y2.tolist(), x2.tolist())) == sorted(zip(x.tolist(), y.tolist()))
    # Both calibrate: only identical (eval seed, calibration seed) pairs count; unmatched runs are left out.
    c = pd.DataFrame({"seed": [0, 0, 1], "calib_seed": [2, 5, 0], "fid": [1.0, 2.0, 3.0]})
    x3, y3 = paired_values(a, c, "fid")
    assert sorted(zip(x3.tolist(), y3.tolist())) == [(12.0, 1.0), (13.0, 3.0)]


def test_kept_apart_warning_names_older_rows(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    write_row(runs, "old", fid=20.0)
    new_row(runs, "new", fid=30.0)
    with caplog.at_level(logging.WARNING):
        from varq.report.rows import warn_kept_apart

        warn_kept_apart(load_rows([runs]))
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 rows of var_d16/class_cond with" in m and "protocol_id" in m and "kept apart" in m
               for m in messages), messages
