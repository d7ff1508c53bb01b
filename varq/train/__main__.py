"""``python -m varq.train`` (``make assets``): retrain every shipped digits asset from fixed seeds on the CPU.

Order: classifier (the metric network), VQ-VAE, VAR. Each asset must pass its quality gate before it is written:
the classifier ≥ 97 % on held-out digits, and FP samples of the VAR recognised as their class ≥ 90 % of the time.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

log = logging.getLogger("varq.train")


def sample_class_accuracy(var, vqvae, per_class: int = 50, cfg: float = 1.5, top_p: float = 0.96) -> float:
    from varq.data.images import to_uint8
    from varq.models.classifier import load_digits_classifier
    from varq.sample.sampler import generate

    classifier = load_digits_classifier()
    labels = torch.arange(var.num_classes).repeat_interleave(per_class)
    img = generate(var, vqvae, labels, cfg=cfg, top_k=0, top_p=top_p, rng=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((classifier(to_uint8(img * 2 - 1)).argmax(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-classifier", action="store_true", help="keep the shipped classifier")
    parser.add_argument("--vqvae-steps", type=int, default=1200)
    parser.add_argument("--var-steps", type=int, default=3000)
    parser.add_argument("--assets-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from varq.models.assets import save_asset
    from varq.train.classifier import build_digits_classifier_asset
    from varq.train.digits_models import digits_model_config, train_var, train_vqvae

    t0 = time.perf_counter()
    if not args.skip_classifier:
        path, acc = build_digits_classifier_asset(assets_dir=args.assets_dir)
        log.info("classifier: held-out accuracy %.4f → %s", acc, path)
    cfg = digits_model_config()
    vqvae = train_vqvae(cfg, steps=args.vqvae_steps)
    var = train_var(cfg, vqvae, steps=args.var_steps)
    acc = sample_class_accuracy(var, vqvae)
    log.info("var_digits FP samples recognised as their class: %.4f", acc)
    if acc < 0.9:
        raise SystemExit(f"VAR quality gate failed: class accuracy {acc:.3f} < 0.90; assets left unchanged")
    meta = {"config": "varq/conf/model/var_digits.yaml", "sample_class_accuracy": round(acc, 4),
            "vqvae_steps": args.vqvae_steps, "var_steps": args.var_steps}
    save_asset("digits_vqvae", vqvae.state_dict(), meta, args.assets_dir)
    save_asset("digits_var", var.state_dict(), meta, args.assets_dir)
    log.info("assets written in %.0f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
