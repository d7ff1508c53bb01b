"""The result row (``row.json``, one per run): every column declared once, with its type and its role.

The pipeline builds rows through ``RESULT_ROW.build`` (a row missing a column, carrying an unknown one or a value
of the wrong type is refused before it is written); the run summary, the tables and the tracker take their column
lists from here. Roles:

- ``key``: what the run is (model, quant, bits, calib, task, backend), the labels tables are laid out by;
- ``identity``: the hashes and numbers that say which rows are the same run, comparable, or seed repeats;
- ``protocol``: the sampling protocol (sample count, seed, eval name, guidance, top-k/top-p, requested metrics);
- ``metric``: one column per metric of ``varq.metrics.registry`` (null when not requested or not defined);
- ``time``: wall time of each stage, summed over attempts (null for a stage that never ran);
- ``provenance``: which code, library, device and dtype produced it, and when;
- ``method``: the method's own scalars (``quant_<name>``, e.g. ours' θ), an open set.

Rows written by earlier versions lack later columns; ``complete=False`` reads them: only ``legacy_required`` must be
present, unknown keys are tolerated, and the columns that are present must have their declared types (or be null).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from varq.metrics.registry import METRICS

ROLES = ("key", "identity", "protocol", "metric", "time", "provenance")
STAGES = ("build", "calibrate", "generate", "metrics")
METHOD_PREFIX = "quant_"
NUMBER = (int, float)
SCALAR = (str, int, float, bool)


class RowError(ValueError):
    """A row that does not fit the schema; the message lists every problem."""


@dataclass(frozen=True)
class Column:
    name: str
    role: str
    types: tuple[type, ...]
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else f"{self.name} is null"
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        if not ok:
            wanted = "/".join(t.__name__ for t in self.types) + (" or null" if self.nullable else "")
            return f"{self.name}={value!r} is {type(value).__name__}, expected {wanted}"
        return None


def _columns() -> tuple[Column, ...]:
    # backend: how the quantized Linears computed (fake | fp8); rows written before it existed ran on fake
    key = [Column(n, "key", (str,)) for n in ("model", "quant", "bits", "calib", "task", "backend")]
    identity = [
        Column("run_id", "identity", (str,)),
        Column("model_id", "identity", (str,)),
        Column("protocol_id", "identity", (str,)),
        Column("quant_id", "identity", (str,)),
        Column("calib_id", "identity", (str,)),
        Column("calib_seed", "identity", (int,), nullable=True),  # null: the method uses no calibration data
        Column("calib_n_images", "identity", (int,), nullable=True),
        Column("w_bits", "identity", (int,), nullable=True),  # null for the FP16 reference
        Column("a_bits", "identity", (int,), nullable=True),
    ]
    protocol = [
        Column("n_samples", "protocol", (int,)),
        Column("seed", "protocol", (int,)),
        Column("eval", "protocol", (str,)),
        Column("cfg", "protocol", NUMBER),
        Column("top_k", "protocol", (int,)),
        Column("top_p", "protocol", NUMBER),
        Column("metrics_requested", "protocol", (list,)),
    ]
    metric = [Column(name, "metric", NUMBER, nullable=True) for name in METRICS]
    time = [Column(f"time_{stage}_s", "time", NUMBER, nullable=True) for stage in STAGES]
    provenance = [
        *(Column(n, "provenance", (str,)) for n in ("git_sha", "torch_version", "device", "dtype")),
        Column("torch_threads", "provenance", (int,)),  # CPU sums depend on it (varq.results.provenance)
        Column("created_at", "provenance", (str,)),
    ]
    return (*key, *identity, *protocol, *metric, *time, *provenance)


@dataclass(frozen=True)
class RowSchema:
    columns: tuple[Column, ...]
    legacy_required: tuple[str, ...]  # what a row of any varq version carries (older rows lack the rest)

    def names(self, *roles: str) -> tuple[str, ...]:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown row roles {sorted(unknown)}; choose from {', '.join(ROLES)}")
        return tuple(c.name for c in self.columns if c.role in roles)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not a row column")

    def problems(self, row: Mapping[str, Any], complete: bool = True) -> list[str]:
        """Every way ``row`` misses the schema. ``complete``: a row of this varq (every column, nothing unknown);
        otherwise a row of any version (``legacy_required`` present, extra keys tolerated)."""
        if not isinstance(row, Mapping):
            return [f"a row is a JSON object, not {type(row).__name__}"]
        known = {c.name: c for c in self.columns}
        required = known if complete else self.legacy_required
        found = [f"missing required column {name!r}" for name in required if name not in row]
        for name, value in row.items():
            if name in known:
                # an older row may hold null where this varq always writes a value; its required columns may not
                lenient = not complete and name not in self.legacy_required and value is None
                problem = None if lenient else known[name].problem(value)
                if problem is not None:
                    found.append(problem)
            elif name.startswith(METHOD_PREFIX):
                if value is not None and not isinstance(value, SCALAR):
                    found.append(f"{name}: a method column holds a scalar or null, not {type(value).__name__}")
            elif complete:
                found.append(f"unknown column {name!r} (declare it in varq.rows, or name a method's scalar "
                             f"{METHOD_PREFIX}<name>)")
        return found

    def check(self, row: Mapping[str, Any], complete: bool = True) -> dict[str, Any]:
        """``row`` as a dict, or RowError listing all its problems."""
        found = self.problems(row, complete)
        if found:
            raise RowError("; ".join(found))
        return dict(row)

    def build(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A complete row in column order (method scalars last, sorted); RowError before anything is written."""
        row = self.check(values, complete=True)
        order = [c.name for c in self.columns]
        extras = sorted(k for k in row if k not in order)
        return {k: row[k] for k in (*order, *extras)}

    def metrics(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {name: row.get(name) for name in self.names("metric")}

    def total_time_s(self, row: Mapping[str, Any]) -> float:
        """The stage times the row holds, summed (0 when none was recorded)."""
        values = (row.get(name) for name in self.names("time"))
        return sum(v for v in values if isinstance(v, NUMBER) and not isinstance(v, bool))


RESULT_ROW = RowSchema(columns=_columns(), legacy_required=("run_id", "model", "quant", "bits", "calib", "task"))

KEY_COLUMNS = RESULT_ROW.names("key")
METRIC_COLUMNS = RESULT_ROW.names("metric")
TIME_COLUMNS = RESULT_ROW.names("time")
# The metrics every summary shows a column for (the digits protocol reports all four); the others (sFID,
# precision, recall) appear where a table asks for them.
SUMMARY_METRICS = ("inception_score", "fid", "fid2fp16", "class_accuracy")

