"""``python -m varq.report.task_figure``: inputs, masks and results of the edit tasks, FP16 next to a method.

Rows per task (inpaint, outpaint, edit): the input image, the mask (red = regenerated), the FP16 result and the
quantized result, for the first image of every class; reads finished runs, generates nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from varq.compose import compose_run_config, fp16_config
from varq.pipeline import load_run_samples
from varq.results.grid import mask_overlay, save_task_panel
from varq.sample.tasks import build_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/tasks.png"))
    parser.add_argument("overrides", nargs="*", help="the runs' overrides, e.g. quant=rtn bits=w4a4 paths.root=runs")
    args = parser.parse_args(argv)
    strips = []
    for name in ("inpaint", "outpaint", "edit"):
        cfg = compose_run_config([f"task={name}", *args.overrides])
        task = build_task(cfg)
        first_of_class = torch.arange(0, len(task.image_ids(cfg.eval)), cfg.task.per_class)
        inputs = task.input_images(cfg.eval)[first_of_class]
        fp16, _ = load_run_samples(fp16_config(cfg), task)
        quant, _ = load_run_samples(cfg, task)
        strips += [inputs, mask_overlay(inputs, task.keep_map()), fp16[first_of_class], quant[first_of_class]]
    save_task_panel(strips, args.out, scale=4)
    print(f"wrote {args.out}: per task (inpaint, outpaint, edit) input, mask, FP16, {cfg.quant_name} {cfg.bits_label}")


if __name__ == "__main__":
    main()
