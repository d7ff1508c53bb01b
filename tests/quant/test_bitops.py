"""BitOPs of one CFG pair (hand count on the tiny VAR) and the θ search under a BitOPs budget (methods.md §3.4)."""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
from varq.calib import CalibSet
from varq.config import BitsConfig
from varq.quant.bitops import choose_theta, extra_cost, model_bitops, theta_grid
from varq.quant.methods.ours import OursConfig, OursLiteVARConfig, ShiftAndSum, ShiftAndSumLiteVAR
from varq.quant.shift_sum import ImportanceRecord, key_orders
from varq.sample.sampler import generate

W4A4 = BitsConfig("w4a4", 4, 4)


def _quantized(method=ShiftAndSum, config=None):
    config = config or OursConfig(iters=0)
    return method(config).quantize(copy.deepcopy(tiny_var()), W4A4)


def test_tiny_model_against_a_hand_count():
    # tiny VAR: width 64, 1 head of 64, depth 2, vocab 32, Cvae 8, scales 1, 2, 4
    # → l = 1, 4, 16 tokens (L = 21), 1, 5, 21 keys.
    # MACs per CFG pair (cond + uncond):
    word_embed = 20 * 8 * 64  # scales 1 and 2 only, embedded once per pair
    ada_lin = 2 * 3 * 64 * 384  # 2 rows per scale
    qkv, proj = 42 * 64 * 192, 42 * 64 * 64  # 2·21 token rows
    fc1, fc2 = 42 * 64 * 256, 42 * 256 * 64
    head_ada, head = 2 * 3 * 64 * 128, 42 * 64 * 32
    linear_macs = word_embed + 2 * (ada_lin + qkv + proj + fc1 + fc2) + head_ada + head
    attn_macs = 2 * 64 * (1 * 1 + 4 * 5 + 16 * 21)  # per matmul per block: 2·H·Σ l_k·S_k·d
    assert linear_macs == 4_569_088 and attn_macs == 45_696
    bitops = model_bitops(_quantized())
    assert bitops.linear == linear_macs * 4 * 4
    assert bitops.attention == 2 * (2 * attn_macs) * 4 * 4
    assert bitops.total == 76_029_952
    # ours_litevar keeps fc2 FP: 16 × 16 bits there
    lite = model_bitops(_quantized(ShiftAndSumLiteVAR, OursLiteVARConfig(iters=0)))
    assert lite.linear - bitops.linear == 2 * fc2 * (16 * 16 - 4 * 4)


def test_row_counts_match_a_real_sampling_pass():
    var, vqvae = tiny_var(), tiny_vqvae()
    rows = Counter()

    def count(mod, args, out, fqn):
        rows.update({fqn: args[0].numel() // args[0].shape[-1]})

    hooks = [
        m.register_forward_hook(lambda mod, args, out, fqn=fqn: count(mod, args, out, fqn))
        for fqn, m in var.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        generate(var, vqvae, torch.tensor([3]), cfg=1.5, top_k=8, top_p=0.9, rng=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    macs = sum(rows[fqn] * m.in_features * m.out_features for fqn, m in var.named_modules()
               if isinstance(m, torch.nn.Linear))
    attn_macs = 2 * 2 * 2 * 64 * (1 * 1 + 4 * 5 + 16 * 21)  # 2 blocks × 2 matmuls
    assert model_bitops(var).total == (macs + attn_macs) * 16 * 16  # the FP model: everything at 16 bits


def _records(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        S = 4 * (k + 1)
        out.append(ImportanceRecord(k % 2, k, 2 + k, torch.rand(2, 3, S, generator=gen).softmax(-1) ** 0.5, 4))
    return out


def test_vectorised_extra_cost_equals_the_per_theta_loop():
    records = _records()
    cost = extra_cost(records, head_dim=64, num_pairs=1)
    for theta in (1e-4, 0.03, 0.17, 0.33, 0.6, 1.0):
        extra = 0.0
        for r in records:  # the released formula, per (block, scale), summed over the pair's rows
            rows, H, s2 = r.importance_BHS.shape
            s1, d = r.num_queries, 64
            n_extra = int((2 ** key_orders(r.importance_BHS, theta) - 1).sum())
            extra += rows * (H * s1 * s2 * 16 + H * s2 * 16 + H * s2 * 4) + n_extra * (d * 16 + s1 + s1 * d * 16)
        assert float(cost(torch.tensor([theta]))[0]) == pytest.approx(extra, rel=1e-12)


def test_theta_is_the_smallest_grid_value_within_budget_and_monotone_in_alpha():
    cost = extra_cost(_records(1), head_dim=64, num_pairs=1)
    total = 40 * cost.const
    thetas = []
    for alpha in (0.03, 0.05, 0.1, 0.2):
        choice = choose_theta(cost, total, alpha=alpha, grid_size=1000)
        assert choice.extra_bitops <= alpha * total and choice.budget_binding
        assert float(cost(torch.tensor([choice.theta - 1e-3]))[0]) > alpha * total  # one grid step lower breaks it
        thetas.append(choice.theta)
    assert thetas == sorted(thetas, reverse=True) and thetas[0] > thetas[-1]
    with pytest.raises(ValueError, match="budget"):
        choose_theta(cost, total, alpha=0.01)  # the fixed overhead alone exceeds 1% here
    assert theta_grid(4).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_calibrated_theta_is_recorded_and_deterministic():
    var, vqvae = tiny_var(), tiny_vqvae()
    label_N, x_NLC, idx = random_teacher_batch(vqvae, B=4, seed=2)
    cs = CalibSet(labels_N=label_N, seeds_N=torch.zeros(4, dtype=torch.long), idx_per_scale=idx,
                  teacher_input_NLC=x_NLC, num_classes=10, cfg=1.5)
    reports = []
    for _ in range(2):
        method = ShiftAndSum(OursConfig(iters=0, alpha=0.02))
        method.attach_sampler(vqvae, SimpleNamespace(cfg=1.5, top_k=8, top_p=0.9))
        qvar = method.calibrate(copy.deepcopy(var), cs, W4A4)
        reports.append(method.report(qvar))
    a, b = reports
    assert a["theta"] == b["theta"] and a["extra_bitops_frac"] == b["extra_bitops_frac"]
    assert 0 < a["extra_bitops_frac"] <= 0.02 and 0 < a["theta"] <= 1 and a["bitops_per_pair"] == 76_029_952
