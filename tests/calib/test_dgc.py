"""calib=dgc: Mahalanobis distances, the cond/uncond ratio on features with a known answer, the C ≥ N tie and its
fallback, both selections, the released row layout, build."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import tiny_var, tiny_vqvae
from varq.calib import build_calibration_set
from varq.calib.dgc import (
    DGCOptions,
    cond_ratio,
    mahalanobis_distances,
    released_order,
    select_rows,
    sink_features,
)

OVERRIDES = ("model=var_tiny", "eval=smoke", "quant=ptq4arvg", "calib.n_images=6", "calib.batch_size=4")


def _embed(values_N: np.ndarray, C: int = 16, seed: int = 0) -> torch.Tensor:
    # 1-D features placed along a random direction of a C > N space, plus a constant offset: the covariance is
    # rank 1, so only the pseudo-inverse gives the (affine-invariant) 1-D distances
    rng = np.random.default_rng(seed)
    u = rng.normal(size=C)
    u /= np.linalg.norm(u)
    return torch.tensor(values_N[:, None] * u[None, :] + rng.normal(size=C)[None, :], dtype=torch.float32)


def _reference_distances(f: np.ndarray) -> np.ndarray:
    centred = f - f.mean(axis=0)
    prec = np.linalg.pinv(np.cov(f, rowvar=False))
    return np.sqrt(np.einsum("nc,cd,nd->n", centred, prec, centred))


def test_mahalanobis_matches_an_independent_computation():
    f = np.random.default_rng(1).normal(size=(10, 24)) * np.linspace(0.1, 5, 24)  # C > N: rank-deficient
    np.testing.assert_allclose(mahalanobis_distances(torch.tensor(f)).numpy(), _reference_distances(f), rtol=1e-6)


def test_cond_ratio_on_features_with_a_known_answer():
    # cond: ±1 alternating → every distance 1/√(8/7) ≈ 0.935; uncond: seven 0s and one 8 → seven at 1/√8 ≈ 0.354 and
    # one at 7/√8 ≈ 2.47. The top 8 of the 16 pooled distances: the uncond outlier and 7 cond rows → ratio 7/8.
    cond = _embed(np.array([1.0, -1.0] * 4), seed=2)
    uncond = _embed(np.array([0.0] * 7 + [8.0]), seed=3)
    d_cond, d_uncond = mahalanobis_distances(cond), mahalanobis_distances(uncond)
    torch.testing.assert_close(d_cond, torch.full((8,), (7 / 8) ** 0.5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(d_uncond[-1], torch.tensor(7 / 8**0.5, dtype=torch.float64), atol=1e-5, rtol=0)
    assert cond_ratio(d_cond, d_uncond, n_keep=8) == 7 / 8
    assert cond_ratio(d_cond, d_uncond, n_keep=1) == 0.0


def test_cond_ratio_is_half_when_the_groups_agree():
    f = _embed(np.array([0.0, 1.0, 5.0, 2.0]))
    d = mahalanobis_distances(f)
    assert cond_ratio(d, d + 5e-4, n_keep=4) == 0.5


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,c", [(8, 8), (8, 32), (5, 64)])
def test_features_wider_than_rows_tie_and_fall_back_to_half(seed, n, c, caplog):
    # C ≥ N: the centred rows span N − 1 dimensions, every leverage is 1 − 1/N, so every distance is (N − 1)/√N in
    # both groups whatever the features; the ratio falls back to 0.5 with a warning, for any seed
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, c, generator=gen) * torch.rand(c, generator=gen) * 10
    uncond = torch.randn(n, c, generator=gen) + 3
    d_cond, d_uncond = mahalanobis_distances(cond), mahalanobis_distances(uncond)
    tie = torch.full((n,), (n - 1) / n**0.5, dtype=torch.float64)
    torch.testing.assert_close(d_cond, tie, atol=1e-6, rtol=0)
    torch.testing.assert_close(d_uncond, tie, atol=1e-6, rtol=0)
    with caplog.at_level("WARNING", logger="varq.calib.dgc"):
        assert cond_ratio(d_cond, d_uncond, n_keep=n) == 0.5
    assert "agree" in caplog.text
    cond_rows, uncond_rows, ratio = select_rows(d_cond, d_uncond, n, DGCOptions(), batch_size=4)
    first = [r for start in range(0, n, 4) for r in range(start, start + round(0.5 * min(4, n - start)))]
    rest = [r for start in range(0, n, 4) for r in range(start, start + min(4, n - start) - round(0.5 * min(4, n - start)))]
    assert ratio == 0.5 and cond_rows.tolist() == first and uncond_rows.tolist() == rest


def test_distinct_distances_give_no_warning(caplog):
    d_cond = torch.tensor([0.1, 0.9, 0.2, 0.8], dtype=torch.float64)
    with caplog.at_level("WARNING", logger="varq.calib.dgc"):
        assert cond_ratio(d_cond, d_cond + 1.0, n_keep=4) == 0.0
    assert caplog.text == ""


def test_released_order_lays_rows_out_batch_by_batch():
    # generation batches of 4: rows 0–3, 4–7, 8–9; each batch contributes its cond rows, then its uncond rows
    rows, uncond = released_order(torch.tensor([0, 1, 4, 5, 8]), torch.tensor([0, 1, 4, 5, 8]), batch_size=4)
    assert rows.tolist() == [0, 1, 0, 1, 4, 5, 4, 5, 8, 8]
    assert uncond.tolist() == [False, False, True, True, False, False, True, True, False, True]


def test_selections():
    d_cond = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7], dtype=torch.float64)
    d_uncond = torch.tensor([0.95, 0.05, 0.05, 0.05, 0.05, 0.05], dtype=torch.float64)
    # intent: the top-6 sequences themselves (cond 1, 3, 5, 4, 2 and uncond 0) → ratio 5/6
    cond, uncond, ratio = select_rows(d_cond, d_uncond, 6, DGCOptions(selection="distance"), batch_size=4)
    assert ratio == 5 / 6 and cond.tolist() == [1, 2, 3, 4, 5] and uncond.tolist() == [0]
    # released: only the ratio; per generation batch the first round(r·B) cond and first B − round(r·B) uncond rows
    cond, uncond, _ = select_rows(d_cond, d_uncond, 6, DGCOptions(selection="ratio"), batch_size=4)
    assert cond.tolist() == [0, 1, 2, 4, 5] and uncond.tolist() == [0]  # batches of 4 (3 + 1) and 2 (2 + 0)


def test_options_come_from_the_calib_config():
    from varq.config import CalibConfig, DGCConfig

    calib = CalibConfig(name="dgc", dgc=DGCConfig(selection="distance", top_p=None, dtype=None))
    assert DGCOptions.from_calib(calib) == DGCOptions(selection="distance", top_p=None, dtype=None)
    for released in (DGCOptions(), DGCOptions.from_calib(CalibConfig(name="dgc"))):  # the released settings
        assert (released.selection, released.top_p, released.dtype, released.feature) == ("ratio", 0.95, "fp32", "sink")
    with pytest.raises(ValueError, match="selection"):
        DGCOptions(selection="entropy")


def test_masked_sink_feature_only_knows_the_label(run_config):
    # why the sink feature uses the unmasked pass: under the block-causal mask token 0 sees itself only
    var, vqvae = tiny_var(), tiny_vqvae()
    cfg = run_config(*OVERRIDES, "calib=random")
    cs = build_calibration_set(cfg, var, vqvae, "cpu")
    cs.labels_N[:] = 3
    masked_cond, _ = sink_features(var, cs, 4, "cpu", feature="mean")
    assert masked_cond.std(0).sum() > 0  # the token mean still varies with the sequence
    from varq.quant.calib_pass import CalibBatch, teacher_forward

    seen = []
    h = var.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[:, 0]))
    with torch.no_grad():
        teacher_forward(var, CalibBatch(*cs.teacher_batch(slice(0, 4)), None), masked=True)
    h.remove()
    torch.testing.assert_close(seen[0], seen[0][:1].expand_as(seen[0]))
    unmasked_cond, _ = sink_features(var, cs, 4, "cpu", feature="sink")
    assert unmasked_cond.std(0).sum() > 0


def test_build_keeps_the_released_rows_in_the_released_layout(run_config, caplog):
    # tiny VAR: C = 64 ≥ N = 6 rows per group, so the distances tie for every seed → ratio 0.5 (warned); generation
    # batches of 4 and 2 keep their first 2 + 2 and 1 + 1 rows, laid out batch by batch, cond rows first
    var, vqvae = tiny_var(), tiny_vqvae()
    cfg = run_config(*OVERRIDES)
    assert cfg.calib.name == "dgc"
    with caplog.at_level("WARNING", logger="varq.calib.dgc"):
        cs = build_calibration_set(cfg, var, vqvae, "cpu")
    assert "agree" in caplog.text
    gen = build_calibration_set(run_config(*OVERRIDES, "calib=random", "calib.seed=42", "eval.top_p=0.95"),
                                var, vqvae, "cpu")
    null = var.num_classes
    assert cs.meta["cond_ratio"] == 0.5 and (cs.meta["n_cond"], cs.meta["n_uncond"]) == (3, 3)
    assert cs.labels_N.tolist() == [*gen.labels_N[:2].tolist(), null, null, gen.labels_N[4].item(), null]
    torch.testing.assert_close(cs.teacher_input_NLC, gen.teacher_input_NLC[[0, 1, 0, 1, 4, 4]])
    assert build_calibration_set(cfg, var, vqvae, "cpu").labels_N.tolist() == cs.labels_N.tolist()  # cached
