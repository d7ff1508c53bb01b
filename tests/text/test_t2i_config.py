"""eval=t2i_smoke composes and validates; every bad text-to-image key is refused up front with one line that names
it, before any folder is created."""

from __future__ import annotations

import pytest

from varq.config import ConfigError
from varq.metrics.registry import METRICS
from varq.text.prompts import read_prompts
from varq.validate import validate_run

OK = ["model=infinity_tiny", "eval=t2i_smoke", "quant=rtn"]


def refused(run_config, tmp_path, *overrides: str) -> str:
    cfg = run_config(*overrides)
    with pytest.raises(ConfigError) as err:
        validate_run(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_t2i_smoke_validates(run_config):
    cfg = run_config(*OK)
    validate_run(cfg)
    ev = cfg.eval
    assert ev.prompts == "varq_prompts" and ev.seeds_per_prompt == 1 and ev.resolution == "0.06M"
    assert "fid2fp16" in ev.metrics and len(read_prompts(ev.prompts, ev.prompts_column, ev.num_prompts)) == 4
    assert cfg.model.text_max_length == 32  # infinity_tiny (the released sizes: 512)


def test_clip_score_is_a_registered_metric(run_config):
    assert "clip_score" in METRICS
    validate_run(run_config(*OK, "eval.metrics=[fid2fp16,clip_score]"))  # without weights: reported as missing


@pytest.mark.parametrize(("override", "key"), [
    ("eval.resolution=2M", "eval.resolution"),
    ("eval.aspect_ratio=1.1", "eval.aspect_ratio"),
    ("eval.seeds_per_prompt=0", "eval.seeds_per_prompt"),
    ("eval.tau=0", "eval.tau"),
    ("eval.num_prompts=0", "eval.num_prompts"),
    ("model.text_max_length=0", "model.text_max_length"),
    ("+model.text_dtype=fp8", "model.text_dtype"),
])
def test_bad_values_name_the_key(run_config, tmp_path, override, key):
    assert refused(run_config, tmp_path, *OK, override).startswith(key)  # model.text_*: not in var_* yamls, hence +


def test_bad_prompt_files(run_config, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    assert "holds no prompts" in refused(run_config, tmp_path, *OK, f"eval.prompts={empty}")
    table = tmp_path / "p.csv"
    table.write_text("caption\na cat\n", encoding="utf-8")
    assert refused(run_config, tmp_path, *OK, f"eval.prompts={table}").startswith("eval.prompts_column='prompt'")
    validate_run(run_config(*OK, f"eval.prompts={table}", "eval.prompts_column=caption"))
    assert "eval.prompts=" in refused(run_config, tmp_path, *OK, f"eval.prompts={tmp_path}/none.txt")


def test_text_encoder_and_clip_folders(run_config, tmp_path):
    assert refused(run_config, tmp_path, "eval=t2i_smoke").startswith("model.text_encoder=None")
    message = refused(run_config, tmp_path, "model=infinity_tiny", "eval=t2i_smoke", f"model.text_encoder={tmp_path}/t5")
    assert message.startswith("model.text_encoder=") and "without internet" in message
    message = refused(run_config, tmp_path, *OK, "eval.metrics=[clip_score]", f"eval.clip_weights={tmp_path}/clip")
    assert message.startswith("eval.clip_weights=")


def test_path_given_protocol_needs_its_prompt_file(run_config, tmp_path):
    message = refused(run_config, tmp_path, "model=infinity_tiny", "eval=t2i_coco")
    assert message.startswith("eval.prompts is not set")
    captions = tmp_path / "captions.json"
    captions.write_text('{"annotations": [{"image_id": 1, "caption": "A cat."}]}', encoding="utf-8")
    cfg = run_config("model=infinity_tiny", "eval=t2i_coco", "quant=rtn", f"eval.prompts={captions}",
                     "eval.metrics=[clip_score]")
    validate_run(cfg)
    assert read_prompts(cfg.eval.prompts, cfg.eval.prompts_column, cfg.eval.num_prompts) == ["A cat."]


def test_clip_score_needs_a_text_to_image_protocol(run_config, tmp_path):
    assert "clip_score needs a text-to-image protocol" in refused(run_config, tmp_path, "eval.metrics=[clip_score]")
