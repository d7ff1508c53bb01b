"""Run ids of existing configurations never move: a run made before a config field was added is found again after.

The ids below were produced by earlier versions of varq for the same command lines (digits FP16, a digits ours
point, a tiny smoke point); the committed digits results carry the first two.
"""

from __future__ import annotations

import pytest

from varq.compose import compose_run_config
from varq.identity import run_id


@pytest.mark.parametrize("overrides, expected", [
    (["quant=fp16"], "c451c0a16f"),
    (["quant=ours", "bits=w4a4"], "5cc44f3ccd"),
    (["quant=rtn", "bits=w6a6", "model=var_tiny", "eval=smoke"], "19fdd70f10"),
])
def test_run_ids_of_existing_configurations_are_unchanged(overrides, expected):
    assert run_id(compose_run_config(overrides)) == expected


def test_a_new_field_set_away_from_its_default_is_part_of_the_identity():
    base = compose_run_config(["quant=fp16"])
    assert run_id(compose_run_config(["quant=fp16", "+eval.tau=0.5"])) != run_id(base)
    assert run_id(compose_run_config(["quant=fp16", "+model.text_max_length=77"])) != run_id(base)


def test_the_fast_decoder_is_part_of_the_identity_and_the_reference_one_is_not():
    # eval.decoder=fast rounds differently, so its images must not be reused as the reference decoder's (or back)
    base = compose_run_config(["quant=fp16"])
    assert run_id(compose_run_config(["quant=fp16", "eval.decoder=reference"])) == run_id(base)
    assert run_id(compose_run_config(["quant=fp16", "eval.decoder=fast"])) != run_id(base)


def test_the_fp16_reference_of_a_fast_decoder_run_decodes_fast_too():
    # FID2FP16 compares like with like: the reference shares the quantized run's decoder and so its run id
    from varq.compose import fp16_config

    cfg = compose_run_config(["quant=ours", "bits=w4a4", "eval.decoder=fast"])
    assert fp16_config(cfg).eval.decoder == "fast"
    assert run_id(fp16_config(cfg)) == run_id(compose_run_config(["quant=fp16", "eval.decoder=fast"]))
