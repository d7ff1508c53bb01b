"""The metric names ``eval.metrics`` and ``varq-eval --metrics`` accept, and what each needs from the reference."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    needs: str = ""  # what the reference must provide beyond mu/sigma ("" if nothing)


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("inception_score", "Inception Score of the samples (the extractor's logits)"),
        MetricInfo("fid", "Fréchet distance of pool features to the reference statistics (mu, sigma)"),
        MetricInfo("fid2fp16", "Fréchet distance to the FP16 model's samples with the same labels and seeds"),
        MetricInfo("class_accuracy", "fraction of samples the digits classifier assigns to the conditioned class"),
        MetricInfo("sfid", "Fréchet distance of spatial features (ADM: mixed_6/conv, 7 channels)", "mu_s, sigma_s"),
        MetricInfo("precision", "share of samples inside the reference's k-NN manifold (k=3)", "features"),
        MetricInfo("recall", "share of reference points inside the samples' k-NN manifold (k=3)", "features"),
        MetricInfo("clip_score", "mean 100·max(cos, 0) of CLIP image vs prompt embeddings (text-to-image; missing "
                   "without eval.clip_weights)"),
    )
}


def check_metric_names(names: Iterable[str], key: str = "eval.metrics") -> tuple[str, ...]:
    """The names, validated: an unknown one is an error that names the key and lists the valid names."""
    names = tuple(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"{key}: unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return names
