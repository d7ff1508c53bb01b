"""The VAR quantization adapter: what runs quantized, FP equivalence of the explicit attention, state, toggles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.tiny import random_teacher_batch, tiny_var, tiny_vqvae
from varq.config import BitsConfig
from varq.quant import FakeQuantizer, PerScale, PerToken, QuantLinear, QuantSpec
from varq.quant.attention import OPERANDS, AttentionOperandQuant
from varq.quant.methods.litevar import LiteVARConfig, litevar_policy
from varq.quant.methods.rtn import RTNConfig, rtn_policy
from varq.quant.model import (
    QuantPolicy,
    attention_quants,
    dequantize_var,
    load_quantizer_state_dict,
    quant_enabled,
    quant_linears,
    quantizable_linears,
    quantize_var,
    quantizer_state_dict,
)
from varq.quant.replay import forward_kv_cached
from varq.sample.sampler import generate

W4A4, W8A8 = BitsConfig("w4a4", 4, 4), BitsConfig("w8a8", 8, 8)
ALL_LINEARS = [
    "word_embed",
    *[f"blocks.{i}.{n}" for i in range(2) for n in ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2", "ada_lin.1")],
    "head_nm.ada_lin.1", "head",
]


@pytest.fixture(scope="module")
def models():
    return tiny_var(), tiny_vqvae()


def _sample(var, vqvae, **hooks):
    return generate(var, vqvae, torch.tensor([1, 7]), cfg=1.5, top_k=8, top_p=0.9,
                    rng=torch.Generator().manual_seed(3), **hooks)


def _count_quantizer_calls(var) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fqn, m in var.named_modules():
        if isinstance(m, FakeQuantizer):
            counts[fqn] = 0
            m.register_forward_hook(lambda mod, args, out, fqn=fqn: counts.__setitem__(fqn, counts[fqn] + 1))
    return counts


def test_quantizable_linears_lists_every_linear_by_fqn(models):
    var, _ = models
    assert sorted(quantizable_linears(var)) == sorted(ALL_LINEARS)
    assert {fqn for fqn, m in var.named_modules() if isinstance(m, nn.Linear)} == set(ALL_LINEARS)


@pytest.mark.parametrize("mode", ["teacher_forced", "kv_cached"])
def test_every_policy_linear_and_operand_runs_quantized(models, mode):
    var, vqvae = copy.deepcopy(models[0]), models[1]
    quantize_var(var, rtn_policy(RTNConfig()), W4A4)
    assert sorted(quant_linears(var)) == sorted(ALL_LINEARS)
    assert len(attention_quants(var)) == 2
    counts = _count_quantizer_calls(var)
    with torch.no_grad():
        if mode == "teacher_forced":
            label_B, x_BLC, _ = random_teacher_batch(vqvae)
            var(label_B, x_BLC)
        else:
            _sample(var, vqvae)
    for fqn, ql in quant_linears(var).items():
        assert ql.calls > 0, fqn
    never = [fqn for fqn, n in counts.items() if n == 0]
    assert not never, f"quantizers that never ran: {never}"
    assert any(".mat_qkv.input_quantizer" in k for k in counts) and any(".attn_quantizer" in k for k in counts)
    for op in attention_quants(var).values():
        assert op.calls == (1 if mode == "teacher_forced" else 3)


def test_layers_outside_the_policy_stay_plain(models):
    var = quantize_var(copy.deepcopy(models[0]), litevar_policy(LiteVARConfig()), W4A4)
    for i in range(2):
        assert type(var.get_submodule(f"blocks.{i}.ffn.fc2")) is nn.Linear
        assert isinstance(var.get_submodule(f"blocks.{i}.ffn.fc1"), QuantLinear)
    assert sorted(quant_linears(var)) == sorted(f for f in ALL_LINEARS if not f.endswith("fc2"))


def _block_causal_bias(patch_nums=(1, 2, 4)) -> torch.Tensor:
    scale_L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)])
    return torch.where(scale_L[:, None] >= scale_L[None, :], 0.0, -torch.inf).view(1, 1, 21, 21)


def test_disabled_operand_quant_matches_sdpa_with_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 16, generator=gen) for _ in range(3))
    bias = _block_causal_bias()
    quantizers = {name: FakeQuantizer(QuantSpec(4, "uniform", PerToken())) for name in OPERANDS}
    op = AttentionOperandQuant(**quantizers)
    for qz in quantizers.values():
        qz.enabled = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.7)
    torch.testing.assert_close(op(q, k, v, bias, 0.7), ref, atol=1e-5, rtol=1e-5)
    assert op.calls == 1
    assert (AttentionOperandQuant()(q, k, v, bias, 0.7) - ref).abs().max() < 1e-5


def test_disabled_quantization_reproduces_fp_model_teacher_forced_and_kv_cached(models):
    var, vqvae = models
    qvar = quantize_var(copy.deepcopy(var), rtn_policy(RTNConfig()), W4A4)
    label_B, x_BLC, _ = random_teacher_batch(vqvae)
    fp_logits, q_logits = [], []
    with torch.no_grad(), quant_enabled(qvar, weights=False, activations=False):
        torch.testing.assert_close(qvar(label_B, x_BLC), var(label_B, x_BLC), atol=1e-5, rtol=1e-5)
        img_fp = _sample(var, vqvae, on_logits=lambda si, lg: fp_logits.append(lg))
        img_q = _sample(qvar, vqvae, on_logits=lambda si, lg: q_logits.append(lg))
    for a, b in zip(q_logits, fp_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img_q, img_fp, atol=1e-5, rtol=1e-5)
    assert all(op.calls == 4 for op in attention_quants(qvar).values())  # 1 teacher-forced + 3 scales
    with torch.no_grad():  # and the flags came back
        assert (qvar(label_B, x_BLC) - var(label_B, x_BLC)).abs().max() > 1e-3


def test_quant_enabled_switches_weights_and_activations_separately(models):
    var, vqvae = models
    qvar = quantize_var(copy.deepcopy(var), rtn_policy(RTNConfig()), W4A4)
    label_B, x_BLC, _ = random_teacher_batch(vqvae)
    with torch.no_grad():
        fp = var(label_B, x_BLC)
        with quant_enabled(qvar, activations=False):
            w_only = qvar(label_B, x_BLC)
        with quant_enabled(qvar, weights=False):
            a_only = qvar(label_B, x_BLC)
        both = qvar(label_B, x_BLC)
    errs = [(y - fp).norm().item() for y in (w_only, a_only, both)]
    assert all(e > 1e-3 for e in errs) and len({round(e, 6) for e in errs}) == 3
    # weights only: a plain linear with the fake-quantized weight reproduces the layer
    head = qvar.head
    with torch.no_grad(), quant_enabled(head, activations=False):
        x = torch.randn(3, 64)
        torch.testing.assert_close(head(x), F.linear(x, head.weight_quantizer(head.weight), head.bias))


@pytest.mark.parametrize("w_bits", [4, 8])
def test_weight_rows_respect_the_bit_width(models, w_bits):
    bits = BitsConfig(f"w{w_bits}a8", w_bits, 8)
    qvar = quantize_var(copy.deepcopy(models[0]), rtn_policy(RTNConfig()), bits)
    for fqn, ql in quant_linears(qvar).items():
        w_hat = ql.weight_quantizer(ql.weight).detach()
        levels = max(len(torch.unique(row)) for row in w_hat)
        assert levels <= 2**w_bits, fqn
        assert not torch.equal(w_hat, ql.weight), fqn
    x = torch.randn(5, 64) * 3
    assert max(len(torch.unique(r)) for r in qvar.head.input_quantizer(x)) <= 2**8


def test_quantizer_state_is_small_and_round_trips(models):
    var, vqvae = models
    qvar = quantize_var(copy.deepcopy(var), litevar_policy(LiteVARConfig()), W4A4)
    state = quantizer_state_dict(qvar)
    fp_keys = set(var.state_dict())
    assert state and not (set(state) & fp_keys)
    assert all(("_quantizer." in k) or (".operand_quant." in k) for k in state)
    fresh = quantize_var(copy.deepcopy(var), litevar_policy(LiteVARConfig()), W4A4)
    for q in fresh.modules():  # scramble the fitted ranges so the load has something to restore
        if isinstance(q, FakeQuantizer) and q.range_max.numel():
            q.range_max = q.range_max + 1.0
    load_quantizer_state_dict(fresh, state)
    label_B, x_BLC, _ = random_teacher_batch(vqvae)
    with torch.no_grad():
        torch.testing.assert_close(fresh(label_B, x_BLC), qvar(label_B, x_BLC), atol=0, rtol=0)
    with pytest.raises(KeyError, match="quantizer state does not fit"):
        load_quantizer_state_dict(quantize_var(copy.deepcopy(var), rtn_policy(RTNConfig()), W4A4), state)


def test_dequantize_restores_the_fp_model_and_strict_checkpoint_loading(models):
    var, vqvae = models
    qvar = quantize_var(copy.deepcopy(var), rtn_policy(RTNConfig()), W4A4)
    dequantize_var(qvar)
    assert not quant_linears(qvar) and not attention_quants(qvar)
    qvar.load_state_dict(var.state_dict(), strict=True)
    label_B, x_BLC, _ = random_teacher_batch(vqvae)
    with torch.no_grad():
        torch.testing.assert_close(qvar(label_B, x_BLC), var(label_B, x_BLC), atol=0, rtol=0)


def test_kv_cached_replay_equals_sampling_of_the_quantized_model(models):
    var, vqvae = models
    qvar = quantize_var(copy.deepcopy(var), rtn_policy(RTNConfig()), W4A4)
    seen_idx, seen_logits = [], []
    with torch.no_grad():
        _sample(qvar, vqvae, on_logits=lambda si, lg: seen_logits.append(lg.clone()),
                override_idx=lambda si, idx: seen_idx.append(idx) or idx)
        x_BLC = vqvae.idxBl_to_var_input(seen_idx)
        label_2B = torch.tensor([1, 7, 10, 10])
        replay = forward_kv_cached(qvar, label_2B, x_BLC.repeat(2, 1, 1), num_cond=2)
    torch.testing.assert_close(replay, torch.cat(seen_logits, dim=1), atol=1e-5, rtol=1e-5)
    assert qvar.token_ctx.scale_idx_L is None and not qvar.blocks[0].attn.caching


def test_per_scale_quantizers_see_the_scale_of_every_token(models):
    """Static per-scale (STWQ-like) quantizers on fc1 inputs and on Q/K get the token scales from the context."""
    var, vqvae = models

    def per_scale():
        return FakeQuantizer(QuantSpec(8, "uniform", PerScale(3), dynamic=False))

    policy = QuantPolicy(
        linear_quantizers=lambda fqn, lin, bits: (None, per_scale()), include=("blocks.*.ffn.fc1",),
        attention_quantizers=lambda i, bits: {"q_quantizer": per_scale(), "k_quantizer": per_scale()},
    )
    qvar = quantize_var(copy.deepcopy(var), policy, W8A8)
    static = [m for m in qvar.modules() if isinstance(m, FakeQuantizer)]
    assert len(static) == 2 + 2 * 2
    label_B, x_BLC, _ = random_teacher_batch(vqvae)
    with torch.no_grad():
        for q in static:
            q.observing = True
        qvar(label_B, x_BLC)
        for q in static:
            q.freeze()
        assert all(q.range_max.shape == (3,) and bool(torch.isfinite(q.range_max).all()) for q in static)
        out_tf = qvar(label_B, x_BLC)
        _sample(qvar, vqvae)  # KV-cached steps feed one scale each; keys span the cached scales
    assert (out_tf - var(label_B, x_BLC)).abs().max() > 0
    with pytest.raises(ValueError, match="PerScale input quantizer"):
        bad = QuantPolicy(lambda fqn, lin, bits: (None, per_scale()), include=("word_embed",))
        quantize_var(copy.deepcopy(var), bad, W8A8)


def test_exclude_names_a_layer_kind_or_an_fqn_glob(models):
    def quantized(exclude):
        qvar = quantize_var(copy.deepcopy(models[0]), rtn_policy(RTNConfig(exclude=exclude)), W4A4)
        return sorted(f for f, m in qvar.named_modules() if isinstance(m, QuantLinear))

    by_kind, by_glob = quantized(["ffn_down"]), quantized(["blocks.*.ffn.fc2"])
    assert by_kind == by_glob == sorted(f for f in ALL_LINEARS if not f.endswith("ffn.fc2"))
    assert quantized(["embed", "head"]) == sorted(f for f in ALL_LINEARS if f not in ("word_embed", "head"))


@pytest.mark.parametrize("key", ["exclude", "include"])
def test_a_layer_selection_that_names_nothing_is_refused(models, key):
    policy = rtn_policy(RTNConfig())
    setattr(policy, key, ("ffn_dwn",))  # a typo: neither a kind nor a matching glob
    with pytest.raises(ValueError, match=rf"quant.{key}: \['ffn_dwn'\] name no Linear.*ffn_down"):
        quantize_var(copy.deepcopy(models[0]), policy, W4A4)
