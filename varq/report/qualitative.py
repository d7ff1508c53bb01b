"""The seed papers' qualitative figure: the same labels and seeds sampled by FP16 and by each method, side by side.

Every run of a model × protocol samples identical (label, seed) batches, so sample i of one run and sample i of
another differ only by the quantization. Rows are methods (FP16 first), columns are samples spread over classes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from varq.report.rows import PATH_COLUMN
from varq.results.grid import spread_indices
from varq.sample.shards import read_shard, shard_path


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


def qualitative_png(rows: pd.DataFrame, columns: int = 10, scale: int = 4) -> bytes | None:
    """One figure for rows of a single model × task × bits (plus its FP16 row); None if samples are missing."""
    if rows.empty:
        return None
    order = sorted(rows.itertuples(index=False), key=lambda r: (r.quant != "fp16", r.quant))
    n = int(min(r.n_samples for r in order))
    idx = spread_indices(n, columns)
    strips = []
    for r in order:
        samples = load_samples_at(Path(getattr(r, PATH_COLUMN)).parent, idx)
        if samples is None:
            continue
        strips.append((f"{r.quant} {r.bits}", np.concatenate(list(samples.transpose(0, 2, 3, 1)), axis=1)))
    if len(strips) < 2:
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
