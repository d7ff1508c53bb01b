"""Weights are fake-quantized once: during sampling every weight quantizer call after the first hits its cache, on
the AdaRound-hardened, clamped-zero-point path of ``ours`` too, and any change to the weight or α recomputes."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_var, tiny_vqvae
from varq.config import BitsConfig
from varq.quant.methods.ours import OursConfig, framework_policy
from varq.quant.model import quant_linears, quantize_var
from varq.quant.recon.adaround import install_adaround
from varq.sample.sampler import generate


@pytest.fixture()
def hardened():
    var = quantize_var(tiny_var(), framework_policy(OursConfig()), BitsConfig("w4a4", 4, 4))
    linears = quant_linears(var)
    for linear in linears.values():
        rounding = install_adaround(linear)
        with torch.no_grad():  # move α off its initial value so the hard rounding differs from nearest somewhere
            rounding.alpha.add_(torch.randn(rounding.alpha.shape, generator=torch.Generator().manual_seed(0)))
        rounding.harden()
        linear.weight_quantizer.invalidate_cache()
    return var, linears


def _count_computations(linears):
    counts = {fqn: 0 for fqn in linears}
    for fqn, linear in linears.items():
        q = linear.weight_quantizer
        original = q._fake_quant

        def counted(*args, _fqn=fqn, _original=original, **kwargs):
            counts[_fqn] += 1
            return _original(*args, **kwargs)

        q._fake_quant = counted
    return counts


def _sample(var, seed=0):
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        return generate(var, tiny_vqvae(), labels, rng=torch.Generator().manual_seed(seed), cfg=1.5, top_k=0, top_p=0.9)


def test_sampling_quantizes_each_hardened_weight_once(hardened):
    var, linears = hardened
    assert all(lin.weight_quantizer.spec.clamp_zero_point for lin in linears.values())  # the released weight grid
    counts = _count_computations(linears)
    _sample(var, 0)
    _sample(var, 1)
    assert sum(lin.calls for lin in linears.values()) > 2 * len(linears)  # the Linears really ran, many times
    assert counts == {fqn: 1 for fqn in linears}


def test_the_cached_weight_is_the_recomputed_one_and_changes_invalidate_it(hardened):
    var, linears = hardened
    fqn, linear = next(iter(linears.items()))
    q = linear.weight_quantizer
    with torch.no_grad():
        cached = q(linear.weight)
        q.invalidate_cache()
        assert torch.equal(q(linear.weight), cached)
    counts = _count_computations({fqn: linear})
    with torch.no_grad():
        q(linear.weight)
        assert counts[fqn] == 0
        q.rounding.alpha.neg_()  # α changed in place: the hard rounding flips
        flipped = q(linear.weight)
        assert counts[fqn] == 1 and not torch.equal(flipped, cached)
        linear.weight.mul_(1.0)  # a weight written in place (same values, new version) is recomputed too
        q(linear.weight)
        assert counts[fqn] == 2
