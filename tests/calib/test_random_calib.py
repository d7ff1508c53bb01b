"""calib=random: FP generations with recorded tokens, teacher-forcing input, and the on-disk cache."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import PATCH_NUMS, tiny_var, tiny_vqvae
from varq import calib as calib_pkg
from varq.calib import build_calibration_set, calib_cache_path
from varq.calib import random as random_calib
from varq.sample.sampler import generate

OVERRIDES = ("model=var_tiny", "eval=smoke", "calib=random", "calib.n_images=6", "calib.batch_size=4", "quant=rtn")


@pytest.fixture(scope="module")
def models():
    return tiny_var(), tiny_vqvae()


def test_builds_records_tokens_and_teacher_input(run_config, models):
    var, vqvae = models
    cfg = run_config(*OVERRIDES)
    cs = build_calibration_set(cfg, var, vqvae, "cpu")
    assert len(cs) == 6 and cs.labels_N.dtype == torch.long and int(cs.labels_N.max()) < var.num_classes
    assert [tuple(i.shape) for i in cs.idx_per_scale] == [(6, pn * pn) for pn in PATCH_NUMS]
    assert cs.seeds_N.tolist() == [1235] * 4 + [1236] * 2
    torch.testing.assert_close(cs.teacher_input_NLC, vqvae.idxBl_to_var_input(cs.idx_per_scale), atol=0, rtol=0)
    # the recorded tokens are what the sampler draws for those labels and seeds
    seen = []
    generate(var, vqvae, cs.labels_N[:4], cfg=cfg.eval.cfg, top_k=cfg.eval.top_k, top_p=cfg.eval.top_p,
             rng=torch.Generator().manual_seed(1235), override_idx=lambda si, idx: seen.append(idx) or idx)
    for si, idx in enumerate(seen):
        assert torch.equal(idx, cs.idx_per_scale[si][:4])


def test_teacher_forcing_replays_the_sampled_pass(run_config, models):
    var, vqvae = models
    cfg = run_config(*OVERRIDES)
    cs = build_calibration_set(cfg, var, vqvae, "cpu")
    logits = []
    generate(var, vqvae, cs.labels_N[:4], cfg=cfg.eval.cfg, top_k=cfg.eval.top_k, top_p=cfg.eval.top_p,
             rng=torch.Generator().manual_seed(1235), on_logits=lambda si, lg: logits.append(lg[:4]))
    label_B, x_BLC = cs.teacher_batch(slice(0, 4))
    with torch.no_grad():
        torch.testing.assert_close(var(label_B, x_BLC), torch.cat(logits, dim=1), atol=1e-4, rtol=1e-4)
    label_2B, x_2BLC = cs.teacher_batch([0, 1], with_uncond=True)
    assert label_2B.tolist() == [cs.labels_N[0].item(), cs.labels_N[1].item(), 10, 10] and x_2BLC.shape[0] == 4


def test_cached_on_disk_and_reloaded_without_generating(run_config, models, monkeypatch):
    var, vqvae = models
    cfg = run_config(*OVERRIDES)
    first = build_calibration_set(cfg, var, vqvae, "cpu")
    path = calib_cache_path(cfg, "cpu")
    assert path.is_file() and path.parent.name == "calib" and not list(path.parent.glob("*.tmp*"))
    torch.load(path, weights_only=True)

    def boom(*args, **kwargs):
        raise AssertionError("the cached calibration set was regenerated")

    monkeypatch.setattr(random_calib, "generate", boom)
    again = build_calibration_set(cfg, var, vqvae, "cpu")
    assert torch.equal(again.teacher_input_NLC, first.teacher_input_NLC) and torch.equal(again.labels_N, first.labels_N)
    # a different calibration config is a different set
    other = run_config(*OVERRIDES, "calib.seed=7")
    assert calib_cache_path(other, "cpu") != path
    with pytest.raises(AssertionError, match="regenerated"):
        build_calibration_set(other, var, vqvae, "cpu")


def test_corrupt_cache_is_rebuilt_and_unknown_builder_is_named(run_config, models):
    var, vqvae = models
    cfg = run_config(*OVERRIDES)
    path = calib_cache_path(cfg, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a torch file")
    assert len(build_calibration_set(cfg, var, vqvae, "cpu")) == 6
    cfg.calib.name = "nope"
    with pytest.raises(KeyError, match="unknown calib='nope'"):
        build_calibration_set(cfg, var, vqvae, "cpu")
    assert "random" in calib_pkg.available_builders()
