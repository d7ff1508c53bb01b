"""Infinity: the official layouts, per-scale rotary positions, KV-cached steps = teacher forcing, text handling."""

from __future__ import annotations

import math

import pytest
import torch

from varq.models.checkpoint import CheckpointError
from varq.models.factory import strong_random_init_
from varq.models.infinity import INFINITY_ARCHS, TextCond, build_infinity
from varq.models.infinity_checkpoint import load_infinity, prepare_state_dict, read_infinity_state, read_vae_state
from varq.models.infinity_scales import ASPECT_RATIOS, apply_rope, custom_schedule, rope_table, schedule_for
from varq.models.lookup import adapter_for

# the official infinity_2b layout (keys and shapes outside the blocks, and of one block), read from the released
# model definition; block b lives under block_chunks.{b // 4}.module.{b % 4}
OUTER_2B = {
    "cfg_uncond": (512, 2048), "pos_start": (1, 1, 2048), "text_norm.weight": (2048,),
    "text_proj_for_sos.ca.mat_q": (1, 16, 128), "text_proj_for_sos.ca.v_bias": (2048,),
    "text_proj_for_sos.ca.zero_k_bias": (2048,), "text_proj_for_sos.ca.mat_kv.weight": (4096, 2048),
    "text_proj_for_sos.ca.proj.weight": (2048, 2048), "text_proj_for_sos.ca.proj.bias": (2048,),
    "text_proj_for_ca.0.weight": (2048, 2048), "text_proj_for_ca.0.bias": (2048,),
    "text_proj_for_ca.2.weight": (2048, 2048), "text_proj_for_ca.2.bias": (2048,),
    "lvl_embed.weight": (15, 2048), "word_embed.weight": (2048, 32), "word_embed.bias": (2048,),
    "shared_ada_lin.1.weight": (12288, 2048), "shared_ada_lin.1.bias": (12288,),
    "head_nm.ada_lin.1.weight": (4096, 2048), "head_nm.ada_lin.1.bias": (4096,),
    "head.weight": (64, 2048), "head.bias": (64,),
}
BLOCK_2B = {
    "ada_gss": (1, 1, 6, 2048), "sa.scale_mul_1H11": (1, 16, 1, 1), "sa.q_bias": (2048,), "sa.v_bias": (2048,),
    "sa.zero_k_bias": (2048,), "sa.mat_qkv.weight": (6144, 2048), "sa.proj.weight": (2048, 2048),
    "sa.proj.bias": (2048,), "ca.v_bias": (2048,), "ca.zero_k_bias": (2048,), "ca.mat_q.weight": (2048, 2048),
    "ca.mat_q.bias": (2048,), "ca.mat_kv.weight": (4096, 2048), "ca.proj.weight": (2048, 2048),
    "ca.proj.bias": (2048,), "ffn.fc1.weight": (8192, 2048), "ffn.fc1.bias": (8192,),
    "ffn.fc2.weight": (2048, 8192), "ffn.fc2.bias": (2048,), "ca_norm.weight": (2048,), "ca_norm.bias": (2048,),
}


def _meta(name):
    with torch.device("meta"):
        return build_infinity(name)


def test_infinity_2b_layout_equals_the_official_manifest():
    model = _meta("infinity_2b")
    expected = dict(OUTER_2B)
    for b in range(32):
        expected.update({f"block_chunks.{b // 4}.module.{b % 4}.{k}": v for k, v in BLOCK_2B.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected and len(got) == 694
    assert sum(p.numel() for p in model.parameters()) == 2_204_564_032


@pytest.mark.parametrize("name,params", [("infinity_125m", 125_185_696), ("infinity_8b", 8_375_533_728)])
def test_other_sizes_have_the_official_parameter_counts(name, params):
    assert sum(p.numel() for p in _meta(name).parameters()) == params


def test_scale_schedules():
    s = schedule_for(1.0, "1M")
    assert s.hw[-1] == (64, 64) and s.num_scales == 13 and s.total_len == 10_521 and s.image_hw == (1024, 1024)
    assert schedule_for(1.0, "0.06M").total_len == 521
    assert len(ASPECT_RATIOS) == 15
    tall, wide = schedule_for(1.333, "1M"), schedule_for(0.75, "1M")
    assert wide.hw == tuple((w, h) for h, w in tall.hw) and wide.rope_ref_hw == (54, 72)
    assert schedule_for(1.02, "0.25M") == schedule_for(1.0, "0.25M")  # nearest template
    with pytest.raises(ValueError, match="pixel budget"):
        schedule_for(1.0, "2M")


def test_rope_table_positions_are_normalised_to_the_reference_grid():
    sched = custom_schedule(((1, 1), (2, 2), (4, 4)))
    table = rope_table(sched, head_dim=8)  # 2 row frequencies (1, 1/100) then 2 column frequencies
    assert table.shape == (2, 1 + 4 + 16, 4)
    # token (1, 0) of the 2×2 scale sits at row position 1·4/2 = 2 of the 4×4 reference grid, column 0
    angles = torch.atan2(table[1], table[0])
    assert torch.allclose(angles[1 + 2], torch.tensor([2.0, 0.02, 0.0, 0.0]), atol=1e-6)
    # rotating a pair by its angle: (1, 0) → (cos, sin)
    x = torch.zeros(1, 1, 21, 8)
    x[..., 0] = 1.0
    out = apply_rope(x, table)
    assert torch.allclose(out[0, 0, :, 0], table[0, :, 0]) and torch.allclose(out[0, 0, :, 1], table[1, :, 0])


@pytest.fixture(scope="module")
def tiny():
    model = build_infinity("infinity_tiny", schedule=custom_schedule(((1, 1), (2, 2), (3, 4), (6, 8))))
    return strong_random_init_(model, seed=3)


def _text(B=2, lens=(6, 3), C=256, seed=0, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    Lt = pad_to or max(lens)
    return TextCond(torch.randn(B, Lt, C, generator=g), torch.tensor(lens))


@torch.no_grad()
def test_kv_cached_steps_equal_teacher_forcing_at_every_scale(tiny):
    adapter = adapter_for(tiny)
    text = _text()
    x = torch.randn(2, tiny.L - 1, tiny.Cvae, generator=torch.Generator().manual_seed(1))
    teacher = tiny(text, x)
    for static, prealloc in ((False, False), (True, True)):
        with adapter.kv_session(text, static_modulation=static, preallocate=prealloc) as session:
            h = session.first_input()
            for si, (b, e) in enumerate(tiny.begin_ends):
                logits = session.step(si, h)
                assert torch.allclose(logits, teacher[:, b:e], rtol=1e-5, atol=1e-5 * teacher.abs().max()), si
                if si + 1 < len(tiny.begin_ends):
                    nb, ne = tiny.begin_ends[si + 1]
                    h = session.embed(si + 1, x[:, nb - 1 : ne - 1])


@torch.no_grad()
def test_rotary_positions_matter_per_scale(tiny):
    """With every scale given the positions of the first tokens, later scales change (the official non-fused bug)."""
    text = _text()
    x = torch.randn(2, tiny.L - 1, tiny.Cvae, generator=torch.Generator().manual_seed(1))
    right = tiny(text, x)
    saved = tiny.rope_2Lh.clone()
    try:
        for b, e in tiny.begin_ends:
            tiny.rope_2Lh[:, b:e] = saved[:, : e - b]
        wrong = tiny(text, x)
    finally:
        tiny.rope_2Lh.copy_(saved)
    assert torch.equal(wrong[:, :1], right[:, :1])
    assert (wrong[:, 1:] - right[:, 1:]).abs().max() > 1e-3


@torch.no_grad()
def test_padding_beyond_the_text_length_is_ignored(tiny):
    short = _text(lens=(6, 3))
    padded = TextCond(torch.cat((short.features_BLtC, 100 * torch.randn(2, 5, 256)), dim=1), short.lens_B)
    padded.features_BLtC[1, 3:6] = -50.0  # row 1 has 3 real tokens: everything after them is padding
    x = torch.randn(2, tiny.L - 1, tiny.Cvae)
    assert torch.allclose(tiny(short, x), tiny(padded, x), atol=1e-5)


def test_unconditional_text_is_the_learned_rows(tiny):
    text = _text(lens=(6, 3))
    pair = tiny.cfg_pair(text)
    assert pair.lens_B.tolist() == [6, 3, 6, 3]
    assert torch.equal(pair.features_BLtC[:2], text.features_BLtC)
    assert torch.equal(pair.features_BLtC[3, :3], tiny.cfg_uncond[:3].detach())


def test_bad_text_is_refused(tiny):
    with pytest.raises(ValueError, match="lengths"):
        TextCond(torch.zeros(2, 4, 256), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="channels"):
        tiny(TextCond(torch.zeros(1, 4, 128), torch.tensor([4])), torch.zeros(1, tiny.L - 1, tiny.Cvae))
    with pytest.raises(ValueError, match="text_maxlen"):
        tiny.uncond(TextCond(torch.zeros(1, 40, 256), torch.tensor([40])))


def test_adapter_declares_every_linear_with_its_kind(tiny):
    sites = adapter_for(tiny).linears()
    by_fqn = {s.fqn: s for s in sites}
    assert by_fqn["block_chunks.1.module.0.ca.mat_kv"].kind == "cross_kv"
    assert by_fqn["block_chunks.1.module.0.ca.mat_kv"].block_idx == 2
    assert not by_fqn["block_chunks.1.module.0.ca.mat_kv"].token_aligned
    assert by_fqn["shared_ada_lin.1"].kind == "adaln"
    assert by_fqn["block_chunks.0.module.1.sa.mat_qkv"].kind == "qkv"
    # 7 per block, plus word_embed, shared_ada_lin, head_nm, head and four text projections
    assert len(sites) == 7 * 4 + 8
    linears = {n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(by_fqn) == linears


def test_strict_loading_drops_derived_buffers_and_fits_cfg_uncond(tiny, caplog):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["attn_bias_for_masking"] = torch.zeros(1)
    longer = torch.cat((state["cfg_uncond"], torch.ones(8, 256)))
    state["cfg_uncond"] = longer
    fresh = build_infinity("infinity_tiny", schedule=tiny.schedule)
    with caplog.at_level("INFO"):
        load_infinity(fresh, state, "ckpt.pth", "model.ckpt")
    assert torch.equal(fresh.cfg_uncond, longer[:32])
    assert "trimmed" in caplog.text and "attn_bias_for_masking" in caplog.text
    shorter = prepare_state_dict(fresh, {"cfg_uncond": longer[:20]})["cfg_uncond"]
    assert torch.equal(shorter[:20], longer[:20]) and torch.equal(shorter[20:], fresh.cfg_uncond[20:].detach())
    del state["head.bias"]
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*missing \['head\.bias'\]"):
        load_infinity(fresh, state, "ckpt.pth", "model.ckpt")


def test_tiny_arch_keeps_the_2b_key_pattern():
    assert INFINITY_ARCHS["infinity_tiny"].block_chunks == 2
    tiny_keys = {k.split(".", 4)[-1] for k in build_infinity("infinity_tiny").state_dict() if k.startswith("block_")}
    assert tiny_keys == set(BLOCK_2B)
    assert math.isclose(INFINITY_ARCHS["infinity_2b"].width / INFINITY_ARCHS["infinity_2b"].num_heads, 128)


def test_reading_shards_and_the_nested_tokenizer_file(tiny, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    keys = sorted(state)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({k: state[k] for k in keys[:50]}, str(shards / "model-00001.safetensors"))
    save_file({k: state[k] for k in keys[50:]}, str(shards / "model-00002.safetensors"))
    merged = read_infinity_state(shards, "model.ckpt")
    assert set(merged) == set(state) and all(torch.equal(merged[k], state[k]) for k in keys)
    save_file({keys[0]: state[keys[0]]}, str(shards / "model-00003.safetensors"))
    with pytest.raises(CheckpointError, match="repeats keys"):
        read_infinity_state(shards, "model.ckpt")
    torch.save({"vae": {"w": torch.ones(2)}}, tmp_path / "vae.pth")
    assert torch.equal(read_vae_state(tmp_path / "vae.pth", "model.vae_ckpt")["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="model.vae_ckpt"):
        read_vae_state(tmp_path / "missing.pth", "model.vae_ckpt")


def test_nan_weights_are_refused_at_load(tiny):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="head.weight"):
        load_infinity(build_infinity("infinity_tiny", schedule=tiny.schedule), state, "ckpt.pth", "model.ckpt")


def test_scale_embedding_goes_before_the_first_chunk_only_unless_told():
    first_only = build_infinity("infinity_tiny")
    every_chunk = build_infinity("infinity_tiny", lvl_embed_first_chunk_only=False)
    assert [first_only.lvl_embedded_before(i) for i in range(4)] == [True, False, False, False]
    assert [every_chunk.lvl_embedded_before(i) for i in range(4)] == [True, False, True, False]
    x = torch.randn(1, first_only.L - 1, 32)
    text = _text(B=1, lens=(3,))
    every_chunk.load_state_dict(first_only.state_dict())
    with torch.no_grad():
        assert not torch.allclose(first_only(text, x), every_chunk(text, x))
