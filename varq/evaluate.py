"""varq-eval: score any sample set against a reference npz, export a run as ADM's npz, build a reference.

    python -m varq.evaluate SAMPLES --ref REF.npz [--extractor inception|varq-digits] [--metrics ...] [--out r.json]
    python -m varq.evaluate export RUN_DIR OUT.npz
    python -m varq.evaluate reference IMAGES|var_digits OUT.npz [--extractor ...] [--image-size 16]

SAMPLES is a varq run directory (its uint8 shards, in the run's order), an ADM-style npz (``arr_0`` uint8
N×H×W×3, optional ``arr_1`` labels) or a folder of images. REF is ADM's reference batch (``mu``/``sigma``,
``mu_s``/``sigma_s``, ``arr_0``) or a reference written by the ``reference`` subcommand. The scores (IS, FID, sFID,
precision, recall, and the digits class accuracy where labels exist) are printed as JSON; a metric the reference
cannot support is null, with the reason under "missing". Bad input exits 2 with one line, before anything is written.

Against ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``), by design:

- FID and precision/recall use pool3 (2048-d), sFID ``mixed_6/conv`` channels 0–6 flattened in NHWC order (2023-d),
  precision/recall k = 3 with the point itself as neighbour 0 and ``<=`` at the radius: all as ADM.
- The network is torch-fidelity's port of the same TF Inception (features equal to ~1e-7 relative), not the TF graph.
- Precision/recall distances are float32; ADM uses float16 where finite (points within fp16 rounding of a radius
  may switch sides).
- IS is torch-fidelity's (min(10, N // 100) splits after its fixed shuffle); ADM takes chunks of 5,000 in order.
- ``varq-digits`` has no Inception: FID/PR use its 128-d penultimate layer, sFID ``conv3`` after ReLU (8×8, first
  7 channels, 448-d; with the 360-image digits test split as reference its spatial covariance is rank-deficient).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUBCOMMANDS = ("score", "export", "reference")
DIGITS_SOURCE = "var_digits"


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    from varq.metrics.extractors import EXTRACTORS

    parser = argparse.ArgumentParser(prog="varq-eval", description=__doc__.split("\n\n")[0],
                                     epilog="`varq-eval SAMPLES --ref REF …` is short for `varq-eval score SAMPLES …`.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--extractor", choices=EXTRACTORS, default=None,
                       help="feature extractor (default: the run's, the reference's, else inception)")
        p.add_argument("--inception-weights", default=None,
                       help="torch-fidelity inception-v3-compat weights (offline; else $VARQ_INCEPTION_WEIGHTS)")
        p.add_argument("--assets-dir", default=None, help="varq asset folder (digits classifier)")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")

    score = sub.add_parser("score", help="IS, FID, sFID, precision, recall of SAMPLES against --ref")
    score.add_argument("samples", help="run directory, ADM-style .npz or folder of images")
    score.add_argument("--ref", required=True, help="reference npz (ADM's batch or `varq-eval reference` output)")
    score.add_argument("--metrics", nargs="+", default=None,
                       help="subset of the optional metrics to compute (default: all the reference supports)")
    score.add_argument("--isc-splits", type=int, default=None, help="IS splits (default: min(10, N // 100), ≥ 1)")
    score.add_argument("--cache", default=None, help="folder for the reference images' features (ADM batches)")
    score.add_argument("--out", default=None, help="also write the JSON here")
    common(score)

    export = sub.add_parser("export", help="write a run's samples as ADM-style npz (arr_0, arr_1)")
    export.add_argument("run_dir")
    export.add_argument("out", help="output .npz")

    ref = sub.add_parser("reference", help="reference npz (mu, sigma, mu_s, sigma_s, features) of real images")
    ref.add_argument("images", help=f"folder of images, ADM-style .npz, run directory, or {DIGITS_SOURCE!r} "
                                    "(the digits test split)")
    ref.add_argument("out", help="output .npz")
    ref.add_argument("--image-size", type=int, default=32, help=f"resolution of {DIGITS_SOURCE!r} images")
    common(ref)
    return parser


def _out_path(path: str) -> Path:
    out = Path(path)
    if out.suffix != ".npz" and out.suffix != ".json":
        raise UsageError(f"output {path} must end in .npz or .json")
    if not out.parent.exists():
        raise UsageError(f"output folder {out.parent} does not exist")
    return out


def _run_extractor(samples: str) -> str | None:
    config = Path(samples) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model", {}).get("feature_extractor")
    return None


def score(args: argparse.Namespace) -> dict[str, Any]:
    from varq.metrics.fidelity import adm_reference, evaluate
    from varq.metrics.reference import EXTRACTOR_KEY, NpzReference
    from varq.metrics.registry import check_metric_names
    from varq.sample.export import load_sample_set

    out = _out_path(args.out) if args.out else None
    metrics = None
    if args.metrics is not None:
        try:
            optional = check_metric_names(args.metrics, key="--metrics")
        except ValueError as err:
            raise UsageError(str(err)) from None
        metrics = sorted({"inception_score", "fid", "class_accuracy", *optional})
    try:
        images, labels, kind = load_sample_set(args.samples)
        ref_extractor = NpzReference(args.ref).get(EXTRACTOR_KEY)  # validates the file before any work
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    extractor = args.extractor or _run_extractor(args.samples) or ref_extractor or "inception"
    # ADM's batch holds images, not features: evaluate extracts them with this same extractor, once per --cache
    reference = adm_reference(args.ref, cache_dir=args.cache)
    splits = args.isc_splits or min(10, max(1, len(images) // 100))  # the pipeline's rule, so IS agrees with a run
    try:
        values = evaluate(images, labels, extractor=extractor, reference=reference, batch_size=args.batch_size,
                          device=args.device, isc_splits=splits, inception_weights=args.inception_weights,
                          assets_dir=args.assets_dir, metrics=metrics)
    except (FileNotFoundError, ValueError) as err:  # missing weights, mismatched extractor or feature spaces
        raise UsageError(str(err)) from None
    result = {"samples": str(args.samples), "samples_kind": kind, "reference": str(args.ref),
              "extractor": extractor, **values}
    if out is not None:
        from varq.atomic import write_json_atomic

        write_json_atomic(out, result)
    return result


def export(args: argparse.Namespace) -> dict[str, Any]:
    from varq.sample.export import export_run
    from varq.sample.shards import ShardError

    out = _out_path(args.out)
    if out.suffix != ".npz":
        raise UsageError(f"export writes an .npz, got {args.out}")
    try:
        path, n = export_run(args.run_dir, out)
    except (FileNotFoundError, ShardError, ValueError) as err:
        raise UsageError(str(err)) from None
    return {"exported": str(path), "n_images": n, "run_dir": str(args.run_dir)}


def reference(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from varq.metrics.fidelity import reference_from_images, save_npz_atomic
    from varq.metrics.reference import reference_arrays
    from varq.sample.export import load_sample_set

    out = _out_path(args.out)
    if out.suffix != ".npz":
        raise UsageError(f"reference writes an .npz, got {args.out}")
    extractor = args.extractor or ("varq-digits" if args.images == DIGITS_SOURCE else "inception")
    try:
        if args.images == DIGITS_SOURCE:
            from varq.data.digits import load_digits_split

            images, _ = load_digits_split("test", image_size=args.image_size)
        else:
            images, _, _ = load_sample_set(args.images)
        ref = reference_from_images(images, extractor, args.batch_size, args.device,
                                    inception_weights=args.inception_weights, assets_dir=args.assets_dir)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    save_npz_atomic(out, reference_arrays(ref))
    return {"reference": str(out), "n_images": len(images), "extractor": extractor,
            "feature_dims": {"pool": int(np.asarray(ref["mu"]).shape[0]), "spatial": int(np.asarray(ref["mu_s"]).shape[0])}}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv.insert(0, "score")  # `varq-eval SAMPLES --ref REF` is the common case
    args = _parser().parse_args(argv)
    try:
        result = {"score": score, "export": export, "reference": reference}[args.command](args)
    except UsageError as err:
        print(f"varq-eval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
