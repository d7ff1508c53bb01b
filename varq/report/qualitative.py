"""The seed papers' qualitative figure: the same labels and seeds sampled by FP16 and by each method, side by side.

Every run of one protocol samples identical (label, seed) batches for a given eval seed, so sample i of one run
and sample i of another differ only by the quantization. Rows are methods (exactly one FP16 row, first), columns
are samples spread over the classes. Runs of other protocols are never mixed in (the caller passes one protocol),
every row uses the same eval seed, and a row whose samples are all zero (a failed or empty run) is left out.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from varq.report.rows import CELL_COLUMNS, PATH_COLUMN, method_labels
from varq.report.vocab import bits_label
from varq.results.grid import spread_indices
from varq.sample.shards import read_shard, shard_path

log = logging.getLogger(__name__)


def load_samples_at(run_dir: Path, indices: list[int]) -> np.ndarray | None:
    """uint8 (len(indices), 3, H, W) from a run's shards, reading only the shards that hold them."""
    if not (run_dir / "config.json").is_file():
        return None
    config = json.loads((run_dir / "config.json").read_text())
    batch_size = int(config["eval"]["batch_size"])
    images, cache = [], {}
    for i in indices:
        b = i // batch_size
        if b not in cache:
            path = shard_path(run_dir / "samples", b)
            if not path.is_file():
                return None
            cache[b] = read_shard(path)[0]
        images.append(cache[b][i % batch_size])
    return np.stack(images)


def pick_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """One run per method cell, all with the same eval seed, and exactly one FP16 run.

    The eval seed is the smallest one that FP16 and the most methods share; within a cell the smallest calibration
    seed (then run id) is taken, so the choice is stable across rebuilds.
    """
    if rows.empty or rows["protocol_id"].nunique() != 1:
        raise ValueError("qualitative_png needs the runs of exactly one protocol")
    fp16 = rows.loc[rows["quant"].eq("fp16")]
    if fp16.empty:
        return rows.iloc[0:0]
    seeds = rows["seed"].fillna(-1)
    fp_seeds = set(fp16["seed"].fillna(-1))
    coverage = {s: rows.loc[seeds.eq(s)].groupby(list(CELL_COLUMNS), dropna=False).ngroups for s in sorted(fp_seeds)}
    seed = max(sorted(coverage), key=lambda s: coverage[s])  # max keeps the first (smallest) seed on ties
    chosen = rows.loc[seeds.eq(seed)].sort_values(["calib_seed", "run_id"], na_position="first", kind="stable")
    picked = chosen.drop_duplicates(list(CELL_COLUMNS), keep="first")
    # Several FP16 cells (e.g. a recorded and an unknown identity) would be several FP16 rows: keep one.
    fp_rows = picked.loc[picked["quant"].eq("fp16")].iloc[:1]
    return pd.concat([fp_rows, picked.loc[picked["quant"].ne("fp16")]])


def qualitative_png(rows: pd.DataFrame, columns: int = 10, scale: int = 4) -> bytes | None:
    """One figure for the runs of a single protocol × bits (plus its FP16 runs); None if samples are missing."""
    if rows.empty:
        return None
    picked = pick_runs(rows)
    if picked.empty:
        return None
    labels = method_labels(picked)
    order = sorted(zip(picked.itertuples(index=False), labels), key=lambda item: (item[0].quant != "fp16", item[1]))
    n = int(min(r.n_samples for r, _ in order))
    idx = spread_indices(n, columns)
    strips = []
    for r, label in order:
        path = Path(getattr(r, PATH_COLUMN))
        samples = load_samples_at(path.parent, idx)
        if samples is None:
            continue
        if not samples.any():
            log.warning("qualitative figure: leaving out %s (%s): its samples are all zero", path, label)
            continue
        text = "FP16" if r.quant == "fp16" else f"{label} {bits_label(r.bits)}"
        strips.append((text, np.concatenate(list(samples.transpose(0, 2, 3, 1)), axis=1)))
    if len(strips) < 2 or strips[0][0] != "FP16":  # nothing to compare against
        return None
    label_w, pad = 110, 2
    h, w = strips[0][1].shape[0] * scale, strips[0][1].shape[1] * scale
    canvas = Image.new("RGB", (label_w + w, len(strips) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, strip) in enumerate(strips):
        img = Image.fromarray(strip).resize((w, h), Image.NEAREST)
        canvas.paste(img, (label_w, k * (h + pad)))
        draw.text((4, k * (h + pad) + h // 2 - 6), label, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
