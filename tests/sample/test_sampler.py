"""Sampler semantics: top-k/top-p masks against a naive reference, seeded determinism, the batch layout."""

from __future__ import annotations

import pytest
import torch

from varq.config import EvalConfig
from varq.sample.filtering import filter_top_k_top_p_
from varq.sample.layout import plan_batches, shard_of
from varq.sample.sampler import generate


def naive_keep(row: list[float], top_k: int, top_p: float) -> list[bool]:
    """Which entries survive, written from the definition one row at a time."""
    keep = [True] * len(row)
    if top_k > 0:
        kth = sorted(row, reverse=True)[top_k - 1]
        keep = [v >= kth for v in row]
    if top_p > 0:
        vals = [v if k else float("-inf") for v, k in zip(row, keep)]
        m = max(vals)
        probs = [torch.tensor(v - m).exp().item() if v != float("-inf") else 0.0 for v in vals]
        z = sum(probs)
        order = sorted(range(len(row)), key=lambda i: vals[i])  # ascending, stable
        cum = 0.0
        for rank, i in enumerate(order):
            cum += probs[i] / z
            if cum <= 1 - top_p and rank != len(order) - 1:
                keep[i] = False
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (3, 0.0), (0, 0.5), (4, 0.9), (1, 0.96), (6, 0.999)])
def test_filter_matches_naive_reference(top_k, top_p):
    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(top_k))
    out = filter_top_k_top_p_(logits.clone(), top_k, top_p)
    for b in range(2):
        for l in range(3):
            expected = naive_keep(logits[b, l].tolist(), top_k, top_p)
            assert (~torch.isneginf(out[b, l])).tolist() == expected


def test_top_k_keeps_ties_and_top_p_keeps_the_largest():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0]]])
    out = filter_top_k_top_p_(logits.clone(), top_k=2, top_p=0.0)
    assert (~torch.isneginf(out)).tolist() == [[[False, True, True, False, True]]]
    peaked = torch.tensor([[[10.0, 0.0, 0.0]]])
    out = filter_top_k_top_p_(peaked.clone(), top_k=0, top_p=0.01)
    assert (~torch.isneginf(out)).tolist() == [[[True, False, False]]]


def test_generation_is_seeded_and_label_dependent():
    from tests.models.test_var import tiny_pair

    var, vqvae = tiny_pair()
    labels = torch.tensor([1, 2, 3])
    kw = dict(cfg=1.5, top_k=10, top_p=0.9)
    a = generate(var, vqvae, labels, rng=torch.Generator().manual_seed(5), **kw)
    b = generate(var, vqvae, labels, rng=torch.Generator().manual_seed(5), **kw)
    c = generate(var, vqvae, labels, rng=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (3, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    smooth = generate(var, vqvae, labels, rng=torch.Generator().manual_seed(5), more_smooth=True, **kw)
    assert smooth.shape == a.shape and not torch.equal(smooth, a)


def test_nonfinite_logits_stop_with_the_scale_named():
    from tests.models.test_var import tiny_pair

    var, vqvae = tiny_pair()
    with torch.no_grad():
        var.head.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="scale 0"):
        generate(var, vqvae, torch.tensor([1]), rng=torch.Generator().manual_seed(0))


def test_batch_plan_is_a_pure_function_and_shards_partition_it():
    cfg = EvalConfig(samples_per_class=3, classes=[4, 1, 7], batch_size=4, seed=10)
    plans = plan_batches(cfg, num_classes=10)
    assert plans == plan_batches(cfg, num_classes=10)
    assert [p.labels for p in plans] == [(4, 4, 4, 1), (1, 1, 7, 7), (7,)]
    assert [p.seed for p in plans] == [10, 11, 12]
    shards = [shard_of(plans, 2, k) for k in range(2)]
    assert sorted(p.index for s in shards for p in s) == [0, 1, 2]
    assert not set(p.index for p in shards[0]) & set(p.index for p in shards[1])
    with pytest.raises(ValueError, match="outside"):
        plan_batches(EvalConfig(classes=[12]), num_classes=10)
