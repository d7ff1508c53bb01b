"""VAR's model adapter: the structure it declares, its passes, and the rule that quant/ goes through it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.tiny import PATCH_NUMS, random_teacher_batch, tiny_var, tiny_vqvae
from varq.models.adapter import LINEAR_KINDS, ModelAdapter, register_adapter
from varq.models.lookup import adapter_for
from varq.models.var_adapter import VARAdapter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def var():
    return tiny_var()


def test_linears_are_every_linear_with_its_kind_in_forward_order(var):
    sites = adapter_for(var).linears()
    expected = [("word_embed", "embed", -1)]
    for i in range(2):  # registration order inside a block: attn, ffn, then ada_lin
        expected += [(f"blocks.{i}.attn.mat_qkv", "qkv", i), (f"blocks.{i}.attn.proj", "attn_out", i),
                     (f"blocks.{i}.ffn.fc1", "ffn_up", i), (f"blocks.{i}.ffn.fc2", "ffn_down", i),
                     (f"blocks.{i}.ada_lin.1", "adaln", i)]
    expected += [("head_nm.ada_lin.1", "head_adaln", -1), ("head", "head", -1)]
    assert [(s.fqn, s.kind, s.block_idx) for s in sites] == expected
    assert {s.kind for s in sites} == set(LINEAR_KINDS)
    # every nn.Linear of the model is declared, nothing else is
    assert {s.fqn for s in sites} == {n for n, m in var.named_modules() if isinstance(m, nn.Linear)}
    aligned = {s.kind for s in sites if s.token_aligned}
    assert aligned == {"qkv", "attn_out", "ffn_up", "ffn_down", "head"}


def test_adaln_sites_name_the_rows_that_modulate_each_consumer(var):
    # recompute the block's AdaLN input with the site's chunks and compare with what the block feeds mat_qkv / fc1
    adapter = adapter_for(var)
    sites = adapter.adaln_sites()
    assert list(sites) == ["blocks.0.attn.mat_qkv", "blocks.0.ffn.fc1", "blocks.1.attn.mat_qkv", "blocks.1.ffn.fc1",
                           "head"]
    gen = torch.Generator().manual_seed(1)
    x_BLC, cond_BD = torch.randn(2, 5, var.C, generator=gen), torch.randn(2, var.C, generator=gen)
    seen = {}
    block = var.blocks[1]
    hooks = [var.get_submodule(f).register_forward_pre_hook(lambda m, a, f=f: seen.__setitem__(f, a[0]))
             for f in ("blocks.1.attn.mat_qkv", "blocks.1.ffn.fc1")]
    with torch.no_grad():
        block(x_BLC, cond_BD, None)
        for h in hooks:
            h.remove()
        site = sites["blocks.1.attn.mat_qkv"]
        ada_out = F.linear(F.silu(cond_BD), block.ada_lin[1].weight, block.ada_lin[1].bias).view(2, 1, site.num_chunks, -1)
        ln = F.layer_norm(x_BLC, (var.C,), eps=1e-6)
        expected = ln * (1 + ada_out[:, :, site.scale_chunk]) + ada_out[:, :, site.shift_chunk]
    torch.testing.assert_close(seen["blocks.1.attn.mat_qkv"], expected, atol=1e-5, rtol=1e-5)
    assert sites["blocks.1.attn.mat_qkv"].bias_fqns == (
        "blocks.1.attn.q_bias", "blocks.1.attn.zero_k_bias", "blocks.1.attn.v_bias")
    assert sites["head"].ada_lin_fqn == "head_nm.ada_lin.1" and not sites["head"].skips_sink


def test_token_context_is_scoped_and_nests(var):
    adapter = adapter_for(var)
    ctx = adapter.token_ctx
    a, b = torch.tensor([0, 1]), torch.tensor([2])
    with adapter.token_context(a, 3):
        with adapter.token_context(b):
            assert ctx.scale_idx_L is b and ctx.num_cond is None
        assert ctx.scale_idx_L is a and ctx.num_cond == 3
    assert ctx.scale_idx_L is None and ctx.num_cond is None
    with pytest.raises(RuntimeError), adapter.token_context(a, 1):
        raise RuntimeError("a failing pass must not leave its context behind")
    assert ctx.scale_idx_L is None


def test_kv_session_steps_equal_the_teacher_forced_pass_and_unmasked_drops_the_mask(var):
    adapter = adapter_for(var)
    label_B, x_BLCv, _ = random_teacher_batch(tiny_vqvae(), B=3, seed=2)
    with torch.no_grad():
        masked = adapter.teacher_forward(label_B, x_BLCv)
        unmasked = adapter.teacher_forward(label_B, x_BLCv, masked=False)
        steps = []
        with adapter.kv_session(label_B, preallocate=True, static_modulation=True) as session:
            x_BlC = session.first_input()
            for si, (begin, end) in enumerate(adapter.scale_bounds):
                if si > 0:
                    x_BlC = session.embed(si, x_BLCv[:, begin - adapter.sink_tokens : end - adapter.sink_tokens])
                steps.append(session.step(si, x_BlC))
    torch.testing.assert_close(torch.cat(steps, dim=1), masked, atol=1e-4, rtol=0)
    # unmasked = the masked pass of a copy whose block-causal bias is all zeros (every token sees every token)
    open_var = copy.deepcopy(var)
    open_var.attn_bias_for_masking.zero_()
    with torch.no_grad():
        torch.testing.assert_close(unmasked, open_var(label_B, x_BLCv), atol=1e-5, rtol=0)
    assert (unmasked - masked).abs().max() > 1e-2
    assert not any(block.attn.caching for block in var.blocks)  # the session switched the cache off again


def test_cost_per_pair_follows_the_scale_structure(var):
    adapter = adapter_for(var)
    tokens = [pn * pn for pn in PATCH_NUMS]  # 1, 4, 16
    rows = {s.kind: adapter.linear_rows_per_pair(s) for s in adapter.linears()}
    assert rows == {"embed": 4 + 16, "adaln": 2 * 3, "head_adaln": 2 * 3, "qkv": 2 * 21, "attn_out": 2 * 21,
                    "ffn_up": 2 * 21, "ffn_down": 2 * 21, "head": 2 * 21}
    cached_keys = [1, 5, 21]
    H, c = var.blocks[0].attn.num_heads, var.blocks[0].attn.head_dim
    assert adapter.attention_macs_per_pair(0) == sum(2 * H * t * s * c for t, s in zip(tokens, cached_keys))


def test_stages_cover_the_forward_pass(var):
    names = [(s.name, s.kind) for s in adapter_for(var).stages()]
    assert names == [("word_embed", "embed"), ("blocks.0.ada_lin", "adaln"), ("blocks.0.attn", "attn"),
                     ("blocks.0.ffn", "ffn"), ("blocks.1.ada_lin", "adaln"), ("blocks.1.attn", "attn"),
                     ("blocks.1.ffn", "ffn"), ("head_nm.ada_lin", "head_adaln"), ("head", "head")]


def test_a_new_family_is_one_registered_adapter():
    class Toy(nn.Module):
        family = "toy_family_for_test"

    with pytest.raises(ModuleNotFoundError):
        adapter_for(Toy())  # no varq.models.toy_family_for_test_adapter module and nothing registered

    @register_adapter("toy_family_for_test")
    class ToyAdapter(ModelAdapter):
        def linears(self):
            return []

    assert isinstance(adapter_for(Toy()), ToyAdapter)
    assert isinstance(adapter_for(tiny_var()), VARAdapter)
    with pytest.raises(TypeError, match="family"):
        adapter_for(nn.Linear(2, 2))


def test_quant_code_names_no_model_structure():
    # every layer, block, scale and pass of the model is reached through varq.models.adapter (comments and
    # docstrings may still speak of VAR); scripts/structure_refs.py prints the per-file counts
    import importlib.util

    spec = importlib.util.spec_from_file_location("structure_refs", ROOT / "scripts" / "structure_refs.py")
    refs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refs)
    # calibration-set builders too: they hook the last block and count scales through the adapter
    offenders = {path: code for package in ("quant", "calib")
                 for path, (code, _) in refs.count_tree(ROOT / "varq" / package).items() if code}
    assert offenders == {}


def assert_last_block_feeds_the_head(model, forward) -> None:
    """The adapter's ``last_block()`` output equals the input of the head's norm (``head_nm``) in one forward."""
    seen: dict[str, torch.Tensor] = {}

    def block_out(_m, _a, out) -> None:
        seen["block"] = out

    def head_in(_m, args) -> None:
        seen["head"] = args[0]

    handles = [adapter_for(model).last_block().register_forward_hook(block_out),
               model.head_nm.register_forward_pre_hook(head_in)]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["block"].float(), seen["head"].float())


@torch.no_grad()
def test_last_block_output_is_the_hidden_state_the_head_reads(var):
    label_B, x_BLCv, _ = random_teacher_batch(tiny_vqvae(), B=2)
    assert_last_block_feeds_the_head(var, lambda: var(label_B, x_BLCv))
