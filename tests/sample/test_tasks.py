"""Inpainting, outpainting and editing (research/var.md §4, §7 item 17): mask semantics against hand-computed
cases, teacher-forced tokens outside the mask at every scale, deterministic plans and outputs, the input folder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.tiny import PATCH_NUMS, tiny_var, tiny_vqvae
from varq.identity import eval_identity
from varq.sample.tasks import box_map, build_task, generate_masked, keep_map, scale_keep_masks

T, F_ = True, False


def grid(mask_l: torch.Tensor) -> list[list[bool]]:
    side = round(mask_l.numel() ** 0.5)
    return mask_l.view(side, side).tolist()


def test_demo_box_on_the_16x16_map():
    map_PP = box_map([0.1, 0.1, 0.8, 0.8], 16)
    # round(1.6) = 2, round(12.8) = 13: rows and columns 2..12 are the box
    expected = torch.zeros(16, 16)
    expected[2:13, 2:13] = 1
    assert torch.equal(map_PP, expected)
    assert torch.equal(keep_map("inpaint", [0.1, 0.1, 0.8, 0.8], 16), 1 - expected)  # inpaint keeps the outside
    assert torch.equal(keep_map("edit", [0.1, 0.1, 0.8, 0.8], 16), 1 - expected)  # edit regenerates the box
    assert torch.equal(keep_map("outpaint", [0.1, 0.1, 0.8, 0.8], 16), expected)  # outpaint keeps the box


def test_per_scale_masks_hand_computed_centre_box():
    # 4×4 map with the centre 2×2 marked. 2×2: each output averages one 2×2 quadrant (3/4 outside, 1/4 inside).
    # 3×3: source coordinates 1/6, 1.5, 17/6 give the 1-D profile [1/6, 1, 1/6] of the box.
    outpaint = scale_keep_masks(keep_map("outpaint", [0.25, 0.25, 0.75, 0.75], 4), (1, 2, 3, 4))
    assert [m.tolist() for m in outpaint[:2]] == [[T], [F_] * 4]  # 1×1 forced keep, 2×2: 0.25 < 0.5
    assert grid(outpaint[2]) == [[F_, F_, F_], [F_, T, F_], [F_, F_, F_]]
    assert grid(outpaint[3]) == [[F_] * 4, [F_, T, T, F_], [F_, T, T, F_], [F_] * 4]
    inpaint = scale_keep_masks(keep_map("inpaint", [0.25, 0.25, 0.75, 0.75], 4), (1, 2, 3, 4))
    assert [m.tolist() for m in inpaint[:2]] == [[T], [T] * 4]  # 0.75 > 0.5
    assert grid(inpaint[2]) == [[T, T, T], [T, F_, T], [T, T, T]]
    assert torch.equal(inpaint[3], ~outpaint[3])


def test_per_scale_masks_threshold_is_strict_and_one_by_one_is_forced():
    # top-left quadrant kept: at 3×3 the middle row/column land exactly on 0.5 (not kept, "> 0.5"),
    # and at 1×1 bilinear gives 0.25, which the forced keep overrides.
    masks = scale_keep_masks(keep_map("outpaint", [0.0, 0.0, 0.5, 0.5], 4), (1, 2, 3, 4))
    assert masks[0].tolist() == [T]
    assert grid(masks[1]) == [[T, F_], [F_, F_]]
    assert grid(masks[2]) == [[T, F_, F_], [F_, F_, F_], [F_, F_, F_]]


def random_images(B: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, 16, 16), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("task", ["inpaint", "outpaint", "edit"])
def test_kept_tokens_equal_the_ground_truth_at_every_scale(task):
    from varq.data.images import to_model_range

    var, vqvae = tiny_var(), tiny_vqvae()
    images = random_images(4)
    keep_l = scale_keep_masks(keep_map(task, [0.1, 0.1, 0.8, 0.8], PATCH_NUMS[-1]), PATCH_NUMS)
    labels = torch.tensor([3, 1, 4, 1]) if task == "edit" else torch.full((4,), var.num_classes)
    seen: dict[int, torch.Tensor] = {}
    out = generate_masked(var, vqvae, images, labels, keep_l, on_tokens=lambda si, idx: seen.__setitem__(si, idx),
                          cfg=1.5, top_k=0, top_p=0.0, rng=torch.Generator().manual_seed(0))
    gt_idx = vqvae.img_to_idxBl(to_model_range(images))
    assert sorted(seen) == list(range(len(PATCH_NUMS)))
    generated_differs = False
    for si, keep in enumerate(keep_l):
        assert torch.equal(seen[si][:, keep], gt_idx[si][:, keep]), f"scale {si}: kept tokens were not replaced"
        generated_differs |= bool((seen[si][:, ~keep] != gt_idx[si][:, ~keep]).any())
    assert generated_differs, "the masked region was never sampled"
    # the recorded tokens are what accumulated into f_hat: decoding them reproduces the output image
    decoded = vqvae.idxBl_to_img([seen[si] for si in range(len(PATCH_NUMS))], same_shape=True, last_one=True)
    torch.testing.assert_close(out, decoded.add(1).mul(0.5), atol=1e-5, rtol=0)


def test_more_smooth_is_refused():
    var, vqvae = tiny_var(), tiny_vqvae()
    keep_l = scale_keep_masks(keep_map("inpaint", [0.1, 0.1, 0.8, 0.8], 4), PATCH_NUMS)
    with pytest.raises(ValueError, match="more_smooth"):
        generate_masked(var, vqvae, random_images(1), torch.tensor([10]), keep_l, more_smooth=True)


def test_plan_is_a_pure_function_of_the_config(run_config):
    cfg = run_config("model=var_tiny", "eval=smoke", "task=inpaint", "task.per_class=3")
    plans = build_task(cfg).plan(cfg.eval)
    assert plans == build_task(cfg).plan(cfg.eval)
    labels = [c for p in plans for c in p.labels]
    assert labels == [c for c in cfg.eval.classes for _ in range(3)]  # true classes, class-major
    assert {c for p in plans for c in p.cond_labels} == {cfg.model.num_classes}  # null label
    assert [p.seed for p in plans] == [cfg.eval.seed + b for b in range(len(plans))]
    ids = [i for p in plans for i in p.image_ids]
    assert len(set(ids)) == len(ids)

    edit = run_config("model=var_tiny", "eval=smoke", "task=edit", "task.per_class=3", "task.edit_shift=3")
    edit_plans = build_task(edit).plan(edit.eval)
    assert [i for p in edit_plans for i in p.image_ids] == ids  # the same images as in/outpainting
    assert [c for p in edit_plans for c in p.labels] == [(c + 3) % 10 for c in labels]
    assert [c for p in edit_plans for c in p.cond_labels] == [(c + 3) % 10 for c in labels]


def test_same_inputs_and_seeds_reproduce_exactly(run_config):
    from varq.models.factory import build_models

    cfg = run_config("model=var_tiny", "eval=smoke", "task=edit", "task.per_class=1")
    var, vqvae = build_models(cfg.model)
    task = build_task(cfg)
    plan = task.plan(cfg.eval)[0]
    a = task.generate_batch(var, vqvae, plan, cfg.eval, torch.device("cpu"))
    b = build_task(cfg).generate_batch(var, vqvae, plan, cfg.eval, torch.device("cpu"))
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    other = task.generate_batch(var, vqvae, dataclasses.replace(plan, seed=plan.seed + 1), cfg.eval,
                                torch.device("cpu"))
    assert not np.array_equal(a, other)


def test_class_cond_identity_and_path_unchanged(run_config):
    from varq.sample.layout import plan_batches
    from varq.sample.tasks import ClassCondTask

    cfg = run_config("model=var_tiny", "eval=smoke")
    task = build_task(cfg)
    assert isinstance(task, ClassCondTask) and task.name == "class_cond"
    assert task.plan(cfg.eval) == plan_batches(cfg.eval, cfg.model.num_classes)  # the plan of every earlier run
    assert eval_identity(cfg)["task"] == {"name": "class_cond"}  # run ids of class_cond runs do not move


def test_bad_task_options_fail_at_start_up(run_config):
    from varq.config import ConfigError

    with pytest.raises(ConfigError, match="box"):
        run_config("task=inpaint", "task.box=[0.5,0.1,0.2,0.8]")
    with pytest.raises(ValueError, match="edit_shift"):
        build_task(run_config("model=var_tiny", "task=edit", "task.edit_shift=10"))
    with pytest.raises(ValueError, match="images_dir"):
        build_task(run_config("model=var_d16", "task=inpaint"))


def test_folder_inputs_class_folders_and_val_transform(tmp_path):
    from PIL import Image

    from varq.data.task_inputs import FolderInputs

    for c in range(3):
        (tmp_path / f"n0{c}").mkdir()
        for k in range(2):
            # 36×18 (w×h): left half dark, right half light; shorter side 18 → round(1.125·16) = 18
            arr = np.zeros((18, 36, 3), np.uint8)
            arr[:, 18:] = 200 + c
            Image.fromarray(arr).save(tmp_path / f"n0{c}" / f"img{k}.png")
    inputs = FolderInputs(tmp_path, image_size=16, num_classes=3)
    assert inputs.labels == [0, 0, 1, 1, 2, 2]
    imgs = inputs.load([0, 5])
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.uint8
    # centre crop: columns 10..25 of the 36 wide image, so the edge (column 18) lands at crop column 8
    assert int(imgs[1, :, :, :6].max()) <= 5 and int(imgs[1, :, :, 11:].min()) >= 195
    with pytest.raises(ValueError, match="class sub-folders"):
        _ = FolderInputs(tmp_path, 16, num_classes=10).labels


def test_pipeline_task_rows_and_fid2fp16(run_config):
    from varq.pipeline import run

    metrics = "eval.metrics=[inception_score,fid,fid2fp16,class_accuracy]"
    cfg = run_config("model=var_tiny", "eval=smoke", "task=outpaint", "task.per_class=1", "quant=rtn", metrics)
    result = run(cfg)
    assert result.row["task"] == "outpaint" and result.reference.row["task"] == "outpaint"
    assert result.row["n_samples"] == len(cfg.eval.classes)
    assert result.row["fid"] is not None and result.row["fid2fp16"] is not None
    assert result.reference.row["fid2fp16"] is None and result.row["class_accuracy"] is not None


@pytest.mark.skipif(
    not __import__("varq.models.assets", fromlist=["asset_path"]).asset_path("digits_var").is_file(),
    reason="varq/assets/digits_var.safetensors is not built (make assets); the edit check needs a trained model",
)
def test_editing_a_digit_raises_the_target_class_probability(run_config):
    from varq.data.images import to_model_range, to_uint8
    from varq.metrics.fidelity import compute_features
    from varq.models.factory import build_models

    cfg = run_config("task=edit", "eval=smoke", "eval.classes=null", "task.per_class=3", "device=cpu")
    var, vqvae = build_models(cfg.model)
    task = build_task(cfg)
    plans = task.plan(cfg.eval)
    edited = torch.cat([torch.from_numpy(task.generate_batch(var, vqvae, p, cfg.eval, torch.device("cpu")))
                        for p in plans])
    with torch.no_grad():
        recon = to_uint8(vqvae.img_to_reconstructed_img(to_model_range(task.input_images(cfg.eval)), last_one=True))
    target = torch.tensor([c for p in plans for c in p.labels])

    def p_target(images: torch.Tensor) -> torch.Tensor:
        probs = compute_features(images, cfg.model.feature_extractor)["logits"].softmax(-1)
        return probs[torch.arange(len(images)), target]

    assert p_target(edited).mean() > p_target(recon).mean() + 0.1
