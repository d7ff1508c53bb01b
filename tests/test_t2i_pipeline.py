"""Text-to-image runs through the pipeline: calibration of bitwise models, validation, and a whole tiny sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from varq.calib.text_set import ProbabilitySums, TextCalibSet, align_bit_frequencies
from varq.compose import compose_run_config
from varq.config import ConfigError
from varq.validate import validate_run

ROOT = Path(__file__).resolve().parents[1]
T2I = ["model=infinity_tiny", "eval=t2i_smoke"]


def test_bit_frequencies_are_aligned_with_the_fewest_flips():
    gen = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (5, 4, 3), generator=gen), torch.randint(0, 2, (5, 9, 3), generator=gen)]
    targets = [torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), torch.tensor([0.25, 0.9, 0.5], dtype=torch.float64)]
    out, flipped = align_bit_frequencies(bits, targets, seed=3)
    expected_flips = 0
    for before, after, target in zip(bits, out, targets):
        tokens = before.shape[0] * before.shape[1]
        ones = after.reshape(tokens, -1).sum(0)
        assert ones.tolist() == torch.round(target * tokens).long().tolist()
        # every flip moves a bit towards the target: the changes are exactly |have − want| per position
        changed = (after != before).reshape(tokens, -1).sum(0)
        assert changed.tolist() == (before.reshape(tokens, -1).sum(0) - ones).abs().tolist()
        expected_flips += int(changed.sum())
    assert sum(flipped) == expected_flips
    again, _ = align_bit_frequencies(bits, targets, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(out, again))  # seeded


def test_probability_sums_follow_guidance_and_the_top_p_cut():
    # two rows (cond, uncond), one token, two bits: logits laid out (bit, value)
    logits = torch.tensor([[[0.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, 3.0, 0.0]]])
    sums = ProbabilitySums(cfg=2.0, top_p=0.97)
    sums(0, logits)
    mixed = 2.0 * logits[0, 0] + (1 - 2.0) * logits[1, 0]  # (0, 4, -3, 0)
    p1 = torch.softmax(mixed.view(2, 2), dim=-1)[:, 1]
    p1 = torch.where(p1 >= 0.97, torch.ones_like(p1), p1)  # 0.982 → 1 (the other value is never drawn)
    torch.testing.assert_close(sums.mean_per_scale()[0], p1.double())


def test_text_calibration_set_round_trips_and_pairs_cond_with_uncond():
    N, Lt, C = 3, 5, 4
    feats = torch.randn(N, Lt, C)
    cset = TextCalibSet(prompts=["a", "b", "c"], features_NLtC=feats, lens_N=torch.tensor([5, 2, 3]),
                        uncond_NLtC=torch.zeros(N, Lt, C), seeds_N=torch.arange(N), bits_per_scale=[torch.zeros(N, 1, 2)],
                        teacher_input_NLC=torch.randn(N, 4, 2), cfg=3.0)
    back = TextCalibSet.from_state(cset.state())
    assert back.prompts == cset.prompts and torch.equal(back.features_NLtC, feats)
    text, x = back.teacher_batch([2, 0], with_uncond=True)
    assert text.lens_B.tolist() == [3, 5, 3, 5] and x.shape == (4, 4, 2)
    torch.testing.assert_close(text.features_BLtC[0], feats[2])
    assert text.features_BLtC[2:].abs().sum() == 0 and torch.equal(x[:2], x[2:])


@pytest.mark.parametrize("overrides, key", [
    (["model=infinity_tiny", "eval=smoke", "quant=rtn"], "eval="),
    (["eval=t2i_smoke", "quant=rtn", "+model.text_encoder=random"], "eval.prompts="),
    ([*T2I, "quant=ptq4arvg"], "quant='ptq4arvg'"),
    ([*T2I, "quant=brecq", "calib=dgc"], "calib='dgc'"),
    ([*T2I, "quant=brecq", "eval.num_prompts=null"], "does not evaluate"),
])
def test_text_to_image_misconfigurations_are_refused_up_front(overrides, key, tmp_path):
    cfg = compose_run_config([*overrides, f"paths.root={tmp_path}/runs"])
    with pytest.raises(ConfigError, match=key):
        validate_run(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_tiny_text_to_image_sweep_writes_rows_with_fid2fp16(tmp_path):
    cmd = [sys.executable, "-m", "varq.run", "-m", "model=infinity_tiny", "quant=rtn,brecq,ours", "bits=w4a4",
           "eval=t2i_smoke", "calib.n_images=4", "calib.batch_size=4", f"paths.root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["quant"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("infinity_tiny/*/row.json"))}
    assert set(rows) == {"fp16", "rtn", "brecq", "ours"}
    for name in ("rtn", "brecq", "ours"):
        assert rows[name]["task"] == "t2i" and rows[name]["n_samples"] == 4
        assert rows[name]["fid2fp16"] is not None and rows[name]["fid2fp16"] > 0
    assert rows["ours"]["calib"] == "resample" and rows["ours"]["quant_theta"] is not None


def test_clip_score_reaches_the_row_metrics_with_each_sample_against_its_prompt(tmp_path):
    from tests.metrics.test_clip_score import tiny_clip  # the tiny random CLIP of those tests
    from varq.identity import run_id
    from varq.metrics.clip_score import clip_score
    from varq.pipeline import compute_metrics
    from varq.sample.t2i import T2ITask

    folder = tiny_clip(tmp_path)
    cfg = compose_run_config([*T2I, "quant=rtn", "eval.metrics=[clip_score]", f"eval.clip_weights={folder}",
                              f"paths.root={tmp_path}/runs"])
    task = T2ITask.of(cfg)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 3, 1])  # prompt indices, in plan order
    got = compute_metrics(cfg, task, images, labels, None, "cpu")
    want = clip_score(images, [task.prompts[i] for i in labels.tolist()], str(folder))
    assert got["clip_score"] == pytest.approx(want, rel=1e-12)
    shuffled = clip_score(images, [task.prompts[i] for i in (0, 1, 2, 3)], str(folder))
    assert want != pytest.approx(shuffled, rel=1e-9)  # the pairing matters: the row uses each sample's own prompt
    # the CLIP model's files are part of what the run's metrics mean
    other = compose_run_config([*T2I, "quant=rtn", "eval.metrics=[clip_score]", f"paths.root={tmp_path}/runs"])
    assert run_id(cfg) != run_id(other)


def test_the_protocols_schedule_is_fixed_at_build_before_quantizers_read_it():
    from varq.models.lookup import adapter_for
    from varq.pipeline import build_model
    from varq.quant.attention import AttentionOperandQuant
    from varq.quant.registry import get_method
    from varq.sample.t2i import check_schedule, schedule_of

    cfg = compose_run_config([*T2I, "quant=rtn", "eval.resolution=0.25M"])
    model, _ = build_model(cfg, torch.device("cpu"))
    assert model.schedule == schedule_of(cfg.eval) and model.schedule.num_scales == 10
    qmodel = get_method("rtn")(cfg.quant).calibrate(model, None, cfg.bits)
    bounds = {tuple(m.scale_bounds) for m in qmodel.modules() if isinstance(m, AttentionOperandQuant)}
    assert bounds == {tuple(adapter_for(qmodel).scale_bounds)}  # the 0.25M structure, not the default 0.06M
    other = compose_run_config([*T2I, "quant=rtn"])
    with pytest.raises(ValueError, match="eval.resolution=0.06M"):
        check_schedule(qmodel, other.eval)  # generation never switches the schedule under the quantizers
