"""Prompt files and the sample plan of the text-to-image protocol.

``eval.prompts`` names a shipped set (``varq_prompts``: written for this project, ``varq/data/prompts/``) or a
file given by path:

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
- ``.csv`` / ``.tsv``: a header row; the prompt is in column ``eval.prompts_column`` (default ``prompt``);
- ``.json``: a list of strings; a list of objects; an object of objects (MJHQ-30K's ``meta_data.json``); or a
  COCO captions file (its ``annotations``, column ``caption``).

The plan is a pure function of (number of prompts, eval config): sample ``n`` is prompt ``n // seeds_per_prompt``
with seed ``eval.seed + n % seeds_per_prompt``, in prompt-major order, cut into batches of ``eval.batch_size``.
Batch ``b`` belongs to shard ``b % num_shards`` (``varq.sample.layout.shard_of`` applies unchanged), so a quantized
run and the FP reference see the same prompts and seeds whatever the sharding.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
SHIPPED_PROMPTS = {"varq_prompts": "varq_prompts.txt"}
DEFAULT_COLUMN = "prompt"
COCO_COLUMN = "caption"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the key and the fix."""


def prompt_file_path(name: str) -> Path:
    """The file behind ``eval.prompts``: a shipped set by name, else a path."""
    if name in SHIPPED_PROMPTS:
        return PROMPTS_DIR / SHIPPED_PROMPTS[name]
    path = Path(name).expanduser()
    if not path.is_file():
        raise PromptFileError(f"eval.prompts={name!r} is neither a shipped set ({', '.join(SHIPPED_PROMPTS)}) nor an "
                              "existing file; point it at a .txt, .csv or .json prompt file")
    return path


def _column_values(records: list[Any], column: str, name: str) -> list[str]:
    if not records or not all(isinstance(r, dict) for r in records):
        raise PromptFileError(f"eval.prompts={name!r}: expected a list of objects with a {column!r} field")
    if any(column not in r for r in records):
        keys = sorted(records[0])
        raise PromptFileError(f"eval.prompts_column={column!r} is missing from {name!r} (fields: {', '.join(keys)}); "
                              "set eval.prompts_column to the field holding the prompt")
    return [str(r[column]) for r in records]


def _read_json(path: Path, column: str | None, name: str) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions
        return _column_values(data["annotations"], column or COCO_COLUMN, name)
    if isinstance(data, dict):  # MJHQ-style: {image id: {"prompt": …, "category": …}}
        return _column_values(list(data.values()), column or DEFAULT_COLUMN, name)
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return list(data)
    if isinstance(data, list):
        return _column_values(data, column or DEFAULT_COLUMN, name)
    raise PromptFileError(f"eval.prompts={name!r}: unsupported JSON layout; use a list of prompts or of objects")


def _read_table(path: Path, column: str | None, name: str) -> list[str]:
    column = column or DEFAULT_COLUMN
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        fields = reader.fieldnames or []
        if column not in fields:
            raise PromptFileError(f"eval.prompts_column={column!r} is not a column of {name!r} (columns: "
                                  f"{', '.join(fields) or 'none'}); set eval.prompts_column to the prompt column")
        return [row[column] or "" for row in reader]


def read_prompts(name: str, column: str | None = None, limit: int | None = None) -> list[str]:
    """The prompts of ``eval.prompts`` (stripped; empty ones dropped), the first ``limit`` when given."""
    path = prompt_file_path(name)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            raw = _read_table(path, column, name)
        elif suffix == ".json":
            raw = _read_json(path, column, name)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            raw = [line for line in lines if not line.lstrip().startswith("#")]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise PromptFileError(f"eval.prompts={name!r} cannot be parsed as {suffix or 'text'} ({err}); fix the file "
                              "or give a .txt with one prompt per line") from None
    prompts = [p.strip() for p in raw if p.strip()]
    if not prompts:
        raise PromptFileError(f"eval.prompts={name!r} holds no prompts; give a file with at least one prompt")
    if limit is not None:
        if limit < 1:
            raise PromptFileError(f"eval.num_prompts={limit} must be ≥ 1 (null: all prompts)")
        prompts = prompts[:limit]
    return prompts


@dataclass(frozen=True)
class PromptBatchPlan:
    """One batch of the text-to-image plan: ``samples`` are (prompt index, seed) pairs."""

    index: int
    samples: tuple[tuple[int, int], ...]
    first_sample: int  # global number of samples[0] (file names, resumption)

    @property
    def prompt_indices(self) -> tuple[int, ...]:
        return tuple(p for p, _ in self.samples)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.samples)


def plan_prompt_samples(num_prompts: int, seeds_per_prompt: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt index, seed) of every sample, prompt-major: prompt i takes seeds seed … seed + seeds_per_prompt − 1."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be ≥ 1")
    if seeds_per_prompt < 1:
        raise ValueError(f"eval.seeds_per_prompt={seeds_per_prompt} must be ≥ 1")
    return [(i, seed + j) for i in range(num_prompts) for j in range(seeds_per_prompt)]


def plan_prompt_batches(num_prompts: int, seeds_per_prompt: int, batch_size: int, seed: int = 0) -> list[PromptBatchPlan]:
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size} must be ≥ 1")
    samples = plan_prompt_samples(num_prompts, seeds_per_prompt, seed)
    return [PromptBatchPlan(index=b, samples=tuple(samples[start : start + batch_size]), first_sample=start)
            for b, start in enumerate(range(0, len(samples), batch_size))]


def plan_from_eval(eval_cfg: Any, num_prompts: int) -> list[PromptBatchPlan]:
    """The plan of an ``EvalConfig`` (``seeds_per_prompt``, ``batch_size``, ``seed``)."""
    return plan_prompt_batches(num_prompts, eval_cfg.seeds_per_prompt, eval_cfg.batch_size, eval_cfg.seed)
