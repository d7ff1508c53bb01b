"""Read what W&B wrote offline (``run-*.wandb``: a LevelDB-style log of protobuf records) without any network.

Tests parse these files instead of trusting that a call "probably" logged: run group and tags, config, history
rows, summary updates and the media files next to them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # crc32 (4) + length (2) + type (1); the file itself starts with a 7-byte ":W&B" header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict[str, Any]:
    """Protobuf update items → a dict; nested keys (media: ["samples", "captions"]) become nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    path: Path
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    artifacts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (type, name, file paths)

    def series(self, key: str) -> list[Any]:
        return [h[key] for h in self.history if key in h]

    def media(self, kind: str) -> list[Path]:
        return sorted(p for p in (self.path / "files" / "media" / kind).rglob("*") if p.is_file())

    def tables(self, name: str) -> list[dict[str, Any]]:
        """Every wandb.Table logged under ``name``, read from the file its history entry points at."""
        return [json.loads((self.path / "files" / entry["path"]).read_text()) for entry in self.series(name)
                if isinstance(entry, dict) and entry.get("_type") == "table-file"]


def read_run(run_dir: Path) -> OfflineRun:
    (run_file,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun(path=Path(run_dir))
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.tags = record.run.run_group, list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            art = record.artifact
            run.artifacts.append((art.type, art.name, [entry.path for entry in art.manifest.contents]))
    return run


def offline_runs(root: Path) -> list[OfflineRun]:
    return [read_run(d) for d in sorted(Path(root).glob("offline-run-*"))]
