"""Prompt files (txt, csv/tsv, json in list / MJHQ / COCO layouts), the shipped set, and the sample plan."""

from __future__ import annotations

import json

import pytest

from varq.sample.layout import shard_of
from varq.text.prompts import (
    PromptFileError,
    plan_prompt_batches,
    plan_prompt_samples,
    prompt_file_path,
    read_prompts,
)


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n a cat \n\n   \n# another comment\na dog # not a comment\nthe sky\n", encoding="utf-8")
    assert read_prompts(str(path)) == ["a cat", "a dog # not a comment", "the sky"]
    assert read_prompts(str(path), limit=2) == ["a cat", "a dog # not a comment"]
    with pytest.raises(PromptFileError, match="eval.num_prompts"):
        read_prompts(str(path), limit=0)


def test_csv_and_tsv_read_the_named_column(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,caption,prompt\n1,"a cat, sitting",x\n2,a dog,y\n', encoding="utf-8")
    assert read_prompts(str(csv_path), "caption") == ["a cat, sitting", "a dog"]
    assert read_prompts(str(csv_path)) == ["x", "y"]  # default column "prompt"
    with pytest.raises(PromptFileError, match="eval.prompts_column='text'.*columns: id, caption, prompt"):
        read_prompts(str(csv_path), "text")
    tsv_path = tmp_path / "p.tsv"
    tsv_path.write_text("prompt\tother\na, b\t1\n", encoding="utf-8")
    assert read_prompts(str(tsv_path)) == ["a, b"]


def test_json_layouts(tmp_path):
    cases = {
        "list.json": (["a cat", "a dog"], None, ["a cat", "a dog"]),
        "records.json": ([{"text": "a cat"}, {"text": "a dog"}], "text", ["a cat", "a dog"]),
        "mjhq.json": ({"000a": {"category": "animals", "prompt": "a cat"}, "000b": {"category": "people",
                                                                                   "prompt": "a dog"}}, None,
                      ["a cat", "a dog"]),
        "coco.json": ({"images": [], "annotations": [{"image_id": 1, "caption": "A cat. "},
                                                     {"image_id": 1, "caption": "A dog."}]}, None, ["A cat.", "A dog."]),
    }
    for name, (data, column, want) in cases.items():
        (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")
        assert read_prompts(str(tmp_path / name), column) == want, name
    with pytest.raises(PromptFileError, match="eval.prompts_column='prompt' is missing"):
        read_prompts(str(tmp_path / "records.json"))


def test_bad_files_are_one_line_errors_naming_the_key(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="eval.prompts=.*holds no prompts"):
        read_prompts(str(empty))
    with pytest.raises(PromptFileError, match="eval.prompts=.*neither a shipped set"):
        read_prompts(str(tmp_path / "missing.txt"))
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(PromptFileError, match="cannot be parsed") as err:
        read_prompts(str(broken))
    assert "\n" not in str(err.value)


def test_shipped_set():
    prompts = read_prompts("varq_prompts")
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    assert prompt_file_path("varq_prompts").name == "varq_prompts.txt"


def test_plan_covers_every_prompt_and_seed_once_in_prompt_major_order():
    samples = plan_prompt_samples(num_prompts=3, seeds_per_prompt=2, seed=10)
    assert samples == [(0, 10), (0, 11), (1, 10), (1, 11), (2, 10), (2, 11)]
    plans = plan_prompt_batches(num_prompts=5, seeds_per_prompt=3, batch_size=4, seed=7)
    assert [len(p.samples) for p in plans] == [4, 4, 4, 3]
    assert [p.first_sample for p in plans] == [0, 4, 8, 12]
    flat = [s for p in plans for s in p.samples]
    assert flat == [(i, 7 + j) for i in range(5) for j in range(3)]
    assert plans[1].prompt_indices == (1, 1, 2, 2) and plans[1].seeds == (8, 9, 7, 8)
    assert plans == plan_prompt_batches(num_prompts=5, seeds_per_prompt=3, batch_size=4, seed=7)  # pure


def test_plan_shards_are_disjoint_and_cover_the_plan():
    plans = plan_prompt_batches(num_prompts=7, seeds_per_prompt=2, batch_size=3)
    shards = [shard_of(plans, 3, k) for k in range(3)]
    indices = sorted(p.index for shard in shards for p in shard)
    assert indices == list(range(len(plans)))
    assert all(p.index % 3 == k for k, shard in enumerate(shards) for p in shard)
    # a sample's (prompt, seed) does not depend on the sharding
    assert sorted(s for shard in shards for p in shard for s in p.samples) == sorted(plan_prompt_samples(7, 2))


def test_plan_rejects_empty_inputs():
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        plan_prompt_samples(3, 0)
    with pytest.raises(ValueError, match="num_prompts"):
        plan_prompt_samples(0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        plan_prompt_batches(3, 1, 0)
