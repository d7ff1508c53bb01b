"""The row schema (varq.rows): the pipeline's rows fit it exactly, round-trip through it and through every reader;
a missing, unknown or mistyped column is reported by name, and a bad row is refused before it is written."""

from __future__ import annotations

import json

import pytest

from varq import pipeline
from varq.metrics.registry import METRICS
from varq.rows import METRIC_COLUMNS, RESULT_ROW, SUMMARY_METRICS, TIME_COLUMNS, RowError

TINY = ["model=var_tiny", "quant=fp16", "eval=smoke", "eval.classes=[0,1,2,3]", "eval.samples_per_class=2",
        "eval.batch_size=8", "eval.metrics=[fid,class_accuracy]"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(row as returned, row as read back from row.json) of one real fp16 run."""
    from tests.conftest import compose_cfg
    from varq.compose import to_run_config

    root = tmp_path_factory.mktemp("rows")
    cfg = to_run_config(compose_cfg([f"paths.root={root}/runs", f"paths.cache={root}/cache", *TINY]))
    result = pipeline.run(cfg)
    return result.row, json.loads(result.paths.row.read_text())


def test_pipeline_row_fits_the_schema_and_round_trips(written):
    row, on_disk = written
    assert on_disk == row
    assert RESULT_ROW.problems(on_disk) == []
    assert RESULT_ROW.build(on_disk) == on_disk  # nothing added, dropped or changed
    assert list(RESULT_ROW.build(on_disk)) == [c.name for c in RESULT_ROW.columns]  # every column, schema order
    assert RESULT_ROW.metrics(on_disk) == {m: on_disk[m] for m in METRICS}
    assert on_disk["fid"] is not None and on_disk["inception_score"] is None  # requested vs not requested
    expected_s = sum(on_disk[t] for t in TIME_COLUMNS if on_disk[t] is not None)
    assert RESULT_ROW.total_time_s(on_disk) == pytest.approx(expected_s) and expected_s > 0


def test_pipeline_row_reads_back_in_the_tables_and_the_summary(written, tmp_path):
    from varq.callbacks import point_line
    from varq.report.rows import load_rows

    _, on_disk = written
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "row.json").write_text(json.dumps(on_disk))
    frame = load_rows([tmp_path])
    assert len(frame) == 1 and frame["run_id"].iloc[0] == on_disk["run_id"]
    assert frame["fid"].iloc[0] == pytest.approx(on_disk["fid"])
    assert f"FID {on_disk['fid']:.2f}" in point_line(0, on_disk)


@pytest.mark.parametrize("column", ["protocol_id", "created_at", "time_metrics_s", "fid"])
def test_missing_column_is_reported_by_name(written, column):
    row = {k: v for k, v in written[1].items() if k != column}
    assert RESULT_ROW.problems(row) == [f"missing required column {column!r}"]
    with pytest.raises(RowError, match=column):
        RESULT_ROW.build(row)
    assert RESULT_ROW.problems(row, complete=False) == []  # a row of an older varq may lack it


def test_rows_of_any_version_need_their_identity_and_keys(written):
    row = {k: v for k, v in written[1].items() if k not in ("run_id", "task")}
    assert RESULT_ROW.problems(row, complete=False) == ["missing required column 'run_id'",
                                                        "missing required column 'task'"]


def test_unknown_column_is_reported_and_method_columns_are_open(written):
    row = {**written[1], "fid_typo": 1.0, "quant_theta": 0.03, "quant_note": "free_run"}
    problems = RESULT_ROW.problems(row)
    assert len(problems) == 1 and "unknown column 'fid_typo'" in problems[0]
    assert RESULT_ROW.problems(row, complete=False) == []
    row.pop("fid_typo")
    assert list(RESULT_ROW.build(row))[-2:] == ["quant_note", "quant_theta"]  # method columns last, sorted
    assert RESULT_ROW.problems({**row, "quant_table": [1, 2]}) == [
        "quant_table: a method column holds a scalar or null, not list"]


@pytest.mark.parametrize("column,value", [("n_samples", "20"), ("seed", True), ("fid", "3.1"), ("model", None),
                                          ("metrics_requested", "fid"), ("created_at", 0)])
def test_wrong_type_is_reported(written, column, value):
    row = {**written[1], column: value}
    problems = RESULT_ROW.problems(row)
    assert len(problems) == 1 and problems[0].startswith(f"{column}=" if value is not None else f"{column} is null")


def test_older_rows_with_nulls_read_but_their_keys_must_be_text(written):
    row = {**written[1], "created_at": None, "protocol_id": None}
    assert RESULT_ROW.problems(row, complete=False) == []
    assert len(RESULT_ROW.problems(row)) == 2
    assert RESULT_ROW.problems({**row, "quant": 3}, complete=False) == ["quant=3 is int, expected str"]


def test_fixture_rows_of_the_table_tests_read(tmp_path):
    from tests.test_tables import new_row, write_row

    for path in (write_row(tmp_path, "old"), new_row(tmp_path, "new")):
        assert RESULT_ROW.problems(json.loads(path.read_text()), complete=False) == []


def test_bad_row_is_refused_before_it_is_written(run_config, monkeypatch):
    from varq import results

    real = results.provenance
    monkeypatch.setattr(pipeline, "provenance", lambda device, dtype: {**real(device, dtype), "hostname": "x"})
    cfg = run_config(*TINY)
    with pytest.raises(RowError, match="unknown column 'hostname'"):
        pipeline.run(cfg)
    assert not pipeline.run_paths(cfg).row.exists()
    monkeypatch.setattr(pipeline, "provenance", real)
    assert RESULT_ROW.problems(pipeline.run(cfg).row) == []  # the stages' artifacts were kept, the row is built


def test_column_lists_come_from_the_schema():
    from varq import tables, tracking
    from varq.callbacks import POINT_FORMAT
    from varq.report import rows as report_rows
    from varq.run import SUMMARY_COLUMNS

    assert METRIC_COLUMNS == tuple(METRICS)
    assert set(SUMMARY_METRICS) <= set(METRIC_COLUMNS) and set(SUMMARY_METRICS) <= set(POINT_FORMAT)
    assert set(SUMMARY_COLUMNS) <= set(RESULT_ROW.names("key", "protocol", "metric"))
    assert report_rows.METRIC_COLUMNS == SUMMARY_METRICS and report_rows.TIME_COLUMNS == TIME_COLUMNS
    assert set(tables.DEFAULT_METRICS) | set(tables.PTQ4ARVG_METRICS) | set(tables.DECIMALS) <= set(METRIC_COLUMNS)
    # W&B: every setting is a declared column, and no measured column (metric, time) is logged as a setting
    assert not set(tracking.SETTING_KEYS) & set(RESULT_ROW.names("metric", "time"))


def test_row_records_the_torch_thread_count_and_older_rows_without_it_still_read(written):
    import torch

    _, on_disk = written
    assert on_disk["torch_threads"] == torch.get_num_threads()
    legacy = {k: v for k, v in on_disk.items() if k != "torch_threads"}
    assert RESULT_ROW.problems(legacy, complete=False) == []
    assert any("torch_threads" in p for p in RESULT_ROW.problems(legacy))  # this varq always writes it
