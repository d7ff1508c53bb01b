"""The sampler's fast path (preallocated KV cache, AdaLN once per batch) against the plain reference loop.

Both must give identical tokens and images for the same seeds: FP, fake-quantized (rtn and Shift-and-Sum, whose
K/V quantizers read the cached keys), under autocast and with the Gumbel-smoothed decode.
"""

from __future__ import annotations

import pytest
import torch

from tests.models.test_var import tiny_pair
from varq.config import BitsConfig
from varq.models.lookup import adapter_for
from varq.quant.methods.ours import OursConfig, framework_policy
from varq.quant.methods.rtn import RTNConfig, rtn_policy
from varq.quant.model import quantize_var
from varq.quant.shift_sum import install_shift_sum
from varq.sample.sampler import generate

W4A4 = BitsConfig(w_bits=4, a_bits=4)


def _sample(var, vqvae, reference_loop: bool, seed: int = 3, **kw):
    tokens = []
    img = generate(
        var, vqvae, torch.tensor([1, 7, 10]), cfg=2.0, top_k=20, top_p=0.9,
        rng=torch.Generator().manual_seed(seed), reference_loop=reference_loop,
        override_idx=lambda si, idx: tokens.append(idx.clone()) or idx, **kw,
    )
    return img, tokens


def _quantized(kind: str):
    var, vqvae = tiny_pair(width=128, heads=2)
    if kind == "rtn":
        quantize_var(var, rtn_policy(RTNConfig()), W4A4)
    elif kind == "ours":
        quantize_var(var, framework_policy(OursConfig()), W4A4)
        install_shift_sum(var, theta=0.02)
    return var, vqvae


@pytest.mark.parametrize("kind", ["fp", "rtn", "ours"])
def test_fast_path_equals_reference_loop(kind):
    var, vqvae = _quantized(kind)
    img_ref, tok_ref = _sample(var, vqvae, reference_loop=True)
    img_fast, tok_fast = _sample(var, vqvae, reference_loop=False)
    assert len(tok_ref) == len(var.patch_nums)
    assert all(torch.equal(a, b) for a, b in zip(tok_ref, tok_fast))
    assert torch.equal(img_ref, img_fast)


@pytest.mark.parametrize("kw", [dict(autocast_dtype=torch.bfloat16), dict(more_smooth=True)])
def test_fast_path_equals_reference_loop_under_autocast_and_smoothing(kw):
    var, vqvae = tiny_pair()
    img_ref, tok_ref = _sample(var, vqvae, reference_loop=True, **kw)
    img_fast, tok_fast = _sample(var, vqvae, reference_loop=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(tok_ref, tok_fast))
    assert torch.equal(img_ref, img_fast)


def _count_calls(module: torch.nn.Module) -> list[int]:
    # an instance-level forward (not a hook: a hook rightly switches the once-per-batch AdaLN off)
    count, inner = [0], module.forward

    def forward(*args, **kwargs):
        count[0] += 1
        return inner(*args, **kwargs)

    module.forward = forward
    return count


def test_fast_path_runs_ada_lin_once_and_fills_a_preallocated_cache():
    var, vqvae = tiny_pair()
    counts = [_count_calls(b.ada_lin[1]) for b in var.blocks] + [_count_calls(var.head_nm.ada_lin[1])]
    seen = []
    attn = var.blocks[0].attn

    def on_logits(si, logits):
        seen.append((attn._kv_buffers is not None, attn.cached_k_BHLc.shape[2]))

    generate(var, vqvae, torch.tensor([2, 3]), rng=torch.Generator().manual_seed(0), on_logits=on_logits)
    assert [c[0] for c in counts] == [1] * len(counts)
    ends = [sum(pn * pn for pn in var.patch_nums[: i + 1]) for i in range(len(var.patch_nums))]
    assert seen == [(True, e) for e in ends]
    assert attn._kv_buffers is None and not attn.caching  # released after sampling

    for c in counts:
        c[0] = 0
    generate(var, vqvae, torch.tensor([2, 3]), rng=torch.Generator().manual_seed(0), reference_loop=True)
    assert [c[0] for c in counts] == [len(var.patch_nums)] * len(counts)


def test_a_hook_or_an_observer_on_ada_lin_keeps_the_per_scale_calls():
    var, _ = tiny_pair()
    assert adapter_for(var).modulation_is_static()
    handle = var.blocks[1].ada_lin[1].register_forward_pre_hook(lambda m, a: None)
    assert not adapter_for(var).modulation_is_static()
    handle.remove()
    quantize_var(var, rtn_policy(RTNConfig()), W4A4)
    assert adapter_for(var).modulation_is_static()
    var.head_nm.ada_lin[1].input_quantizer.observing = True
    assert not adapter_for(var).modulation_is_static()


def test_preallocated_cache_refuses_overflow_and_gradients():
    var, _ = tiny_pair()
    attn = var.blocks[0].attn
    x = torch.randn(2, 3, var.C)
    with pytest.raises(ValueError, match="capacity"):
        attn.kv_caching(True, capacity=0)
    attn.kv_caching(True, capacity=4)
    with torch.no_grad():
        attn(x, attn_bias=None)
        with pytest.raises(ValueError, match="holds 4 tokens"):
            attn(x, attn_bias=None)
    attn.kv_caching(True, capacity=8)
    with pytest.raises(RuntimeError, match="inference"):
        attn(x.requires_grad_(), attn_bias=None)
    attn.kv_caching(False)
