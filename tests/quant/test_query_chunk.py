"""Query-chunked explicit attention: the same logits as the whole-matrix pass, never the whole (B, H, L, S) matrix."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.tiny import PATCH_NUMS, random_teacher_batch
from varq.config import BitsConfig
from varq.quant.attention import AttentionOperandQuant, query_chunks, set_query_chunk
from varq.quant.factories import dynamic_quantizer
from varq.quant.granularity import PerAxes, PerTensor, PerToken
from varq.quant.methods.ours import OursConfig, ShiftAndSum
from varq.quant.methods.ptq4arvg import PTQ4ARVG, PTQ4ARVGConfig
from varq.quant.model import attention_quants
from varq.quant.quantizer import FakeQuantizer, QuantSpec
from varq.quant.replay import forward_kv_cached
from varq.quant.shift_sum import ShiftSumAV, record_importance, set_theta

TOKENS = sum(pn * pn for pn in PATCH_NUMS)  # 21: the teacher-forced L = S
CHUNKS = (3, 4, 5, 8)  # 21 = 7·3 = 4·4 + 5 = 4·5 + 1 (merged) = 2·8 + 5


@pytest.fixture(scope="module")
def ours(models):
    qvar = ShiftAndSum(OursConfig(iters=0, shift_sum=True, reestimate_theta=False)).quantize(
        copy.deepcopy(models[0]), BitsConfig("w4a4", 4, 4))
    set_theta(qvar, 0.01)  # low enough that some keys of every scale get finer rows
    return qvar


@pytest.fixture(scope="module")
def ptq4arvg(models, calib_set):
    return PTQ4ARVG(PTQ4ARVGConfig()).calibrate(copy.deepcopy(models[0]), calib_set, BitsConfig("w6a6", 6, 6))


def _both_passes(qvar, vqvae, chunk):
    set_query_chunk(qvar, chunk)
    label_B, x_BLC, _ = random_teacher_batch(vqvae, B=2, seed=1)
    try:
        with torch.no_grad():
            return qvar(label_B, x_BLC), forward_kv_cached(qvar, label_B, x_BLC, num_cond=1)
    finally:
        set_query_chunk(qvar, None)


class _RowCounter:
    """Forward pre-hook on a softmax quantizer: the most query rows (dim 2) it ever received at once."""

    def __init__(self):
        self.max_rows = 0
        self.calls = 0

    def __call__(self, module, args):
        self.calls += 1
        self.max_rows = max(self.max_rows, args[0].shape[2])


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ours_chunked_logits_equal_the_whole_matrix_bit_for_bit(ours, models, chunk):
    teacher, cached = _both_passes(ours, models[1], None)
    teacher_c, cached_c = _both_passes(ours, models[1], chunk)
    assert torch.equal(teacher_c, teacher)
    assert torch.equal(cached_c, cached)


def test_ours_chunks_really_run_and_shift_sum_is_active(ours, models):
    label_B, x_BLC, _ = random_teacher_batch(models[1], B=2, seed=1)
    with torch.no_grad():
        on = ours(label_B, x_BLC)
        set_theta(ours, math.inf)
        off = ours(label_B, x_BLC)
        set_theta(ours, 0.01)
    assert not torch.equal(on, off)  # the chunk test above compares passes in which shift-and-sum changes values


def test_shift_sum_importance_is_the_row_mean_up_to_summation_order(ours, models):
    label_B, x_BLC, _ = random_teacher_batch(models[1], B=2, seed=1)
    with torch.no_grad(), record_importance(ours) as whole:
        ours(label_B, x_BLC)
    set_query_chunk(ours, 4)
    try:
        with torch.no_grad(), record_importance(ours) as chunked:
            ours(label_B, x_BLC)
    finally:
        set_query_chunk(ours, None)
    assert [(r.block_idx, r.scale_idx, r.num_queries) for r in chunked] == [
        (r.block_idx, r.scale_idx, r.num_queries) for r in whole]
    for a, b in zip(whole, chunked):
        # a sum of chunk sums then one division, against torch's one-pass mean: equal up to the last bits
        torch.testing.assert_close(b.importance_BHS, a.importance_BHS, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk", (3, 8))
def test_ptq4arvg_static_operands_chunked_equal_the_whole_matrix(ptq4arvg, models, chunk):
    assert all(isinstance(op.attn_quantizer, FakeQuantizer) and not op.attn_quantizer.spec.dynamic
               for op in attention_quants(ptq4arvg).values())
    teacher, cached = _both_passes(ptq4arvg, models[1], None)
    teacher_c, cached_c = _both_passes(ptq4arvg, models[1], chunk)
    assert torch.equal(teacher_c, teacher)
    assert torch.equal(cached_c, cached)


@pytest.mark.parametrize("fixture", ["ours", "ptq4arvg"])
def test_no_softmax_slice_holds_more_rows_than_a_chunk(request, models, fixture):
    qvar = request.getfixturevalue(fixture)
    counters = {}
    handles = []
    for i, op in attention_quants(qvar).items():
        counters[i] = _RowCounter()
        handles.append(op.attn_quantizer.register_forward_pre_hook(counters[i]))
    try:
        _both_passes(qvar, models[1], None)
        assert all(c.max_rows == TOKENS for c in counters.values())  # the whole matrix without chunks
        for c in counters.values():
            c.max_rows = c.calls = 0
        _both_passes(qvar, models[1], 4)
    finally:
        for h in handles:
            h.remove()
    # shift-and-sum chunks each scale's rows (16 = 4·4); plain attention chunks all 21 rows (4·4 + 5)
    expected = {"ours": 4, "ptq4arvg": 5}[fixture]
    assert all(c.calls > 0 and c.max_rows == expected for c in counters.values())


def test_chunked_attention_call_allocates_less():
    # one attention call with 64 query rows and keys (head dim 4, so the (B, H, L, c) output is smaller than a
    # (B, H, 8, S) slice): the largest tensor the call creates is one chunk of the matrix instead of all of it
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 4, generator=gen) for _ in range(3))
    spec = QuantSpec(4, "log2", PerToken())
    op = AttentionOperandQuant(attn_quantizer=dynamic_quantizer(spec),
                               v_quantizer=dynamic_quantizer(QuantSpec(4, "uniform", PerAxes((0, 1)))))
    whole = op(q, k, v, None, 1.0)
    sizes = _largest_new_tensor(lambda: op(q, k, v, None, 1.0))
    op.query_chunk = 8
    chunked_sizes = _largest_new_tensor(lambda: op(q, k, v, None, 1.0))
    assert torch.equal(op(q, k, v, None, 1.0), whole)
    assert sizes == 2 * 2 * 64 * 64
    assert chunked_sizes == 2 * 2 * 8 * 64


def _largest_new_tensor(fn) -> int:
    # the largest number of elements of any tensor an aten op returns during fn (dispatch-level, CPU)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with torch.no_grad(), Largest():
        fn()
    return Largest.numel


@pytest.mark.parametrize("num_rows", range(1, 40))
@pytest.mark.parametrize("chunk", (3, 4, 7, 16))
def test_query_chunks_cover_the_rows_with_no_short_tail(num_rows, chunk):
    slices = query_chunks(num_rows, chunk)
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(num_rows))
    sizes = [s.stop - s.start for s in slices]
    assert all(size <= chunk + 2 for size in sizes)
    assert len(slices) == 1 or min(sizes) >= 3


@pytest.mark.parametrize("bad", [0, 1, 2, 2.5, True, -4])
def test_query_chunk_must_be_at_least_three_rows(bad):
    with pytest.raises(ValueError, match="query_chunk"):
        AttentionOperandQuant(query_chunk=bad)
    with pytest.raises(ValueError, match="query_chunk"):
        set_query_chunk(nn.Sequential(AttentionOperandQuant()), bad)


def test_set_query_chunk_reaches_every_block(ours):
    assert set_query_chunk(ours, 6) == len(attention_quants(ours)) == 2
    assert all(op.query_chunk == 6 for op in attention_quants(ours).values())
    set_query_chunk(ours, None)
    assert all(op.query_chunk is None for op in attention_quants(ours).values())


def _call(op):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 4, generator=gen) for _ in range(3))
    return op(q, k, v, None, 1.0)


@pytest.mark.parametrize("granularity", [PerTensor(), PerAxes((0, 1))])
def test_softmax_ranges_spanning_rows_are_refused(granularity):
    op = AttentionOperandQuant(attn_quantizer=dynamic_quantizer(QuantSpec(4, "uniform", granularity)), query_chunk=3)
    with pytest.raises(ValueError, match="per query row or fixed.*query_chunk=None"):
        _call(op)
    op.query_chunk = None
    _call(op)  # the whole matrix is fine


def test_an_observing_softmax_quantizer_is_refused():
    observer = FakeQuantizer(QuantSpec(4, "uniform", PerTensor(), dynamic=False))
    observer.observing = True
    op = AttentionOperandQuant(attn_quantizer=observer, query_chunk=3)
    with pytest.raises(ValueError, match="calibrating"):
        _call(op)
    assert observer.num_observed.numel() == 0  # refused before anything was recorded


def test_an_av_matmul_without_chunk_support_is_refused():
    op = AttentionOperandQuant(v_quantizer=dynamic_quantizer(QuantSpec(4, "uniform", PerAxes((0, 1)))), query_chunk=3)
    op.av_matmul = lambda owner, attn_hat, attn, v: attn_hat @ v
    with pytest.raises(ValueError, match="forward_chunked"):
        _call(op)
    op.av_matmul = ShiftSumAV(theta=0.01)
    out = _call(op)
    op.query_chunk = None
    assert torch.equal(out, _call(op))


def test_the_model_config_sets_the_chunk_of_every_quantized_attention(tmp_path):
    from varq.compose import compose_run_config
    from varq.models.factory import build_models
    from varq.quant.registry import get_method

    cfg = compose_run_config(["model=var_tiny", "quant=rtn", "bits=w4a4", "+model.attn_query_chunk=4"])
    var, _ = build_models(cfg.model)
    qvar = get_method("rtn")(cfg.quant).calibrate(var, None, cfg.bits)
    chunks = [m.query_chunk for m in qvar.modules() if isinstance(m, AttentionOperandQuant)]
    assert chunks and set(chunks) == {4}
