"""The benchmark command: refuses a wrong reference checkout early, writes JSON and a table (no timing asserted)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from varq.bench import main
from varq.bench_table import markdown_table


def test_a_wrong_reference_repo_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--reference-repo", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "models/var.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_digits_benchmark_writes_json_and_table(tmp_path):
    main(["--models", "var_digits", "--reps", "1", "--batch-size", "2", "--calib-iters", "1",
          "--calib-sequences", "1", "--metric-samples", "8", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_cpu.json").read_text())
    (sampling,) = report["sampling"]
    assert sampling["varq_identical_to_reference_loop"] is True
    assert set(sampling["samplers"]) == {"varq", "varq_reference_loop", "varq_fast_decoder"}
    assert sampling["fast_decoder_max_abs_image_diff"] < 1e-3  # the same tokens, decoded up to fp32 rounding
    assert set(sampling["decoders"]) == {"varq", "varq_fast"}  # no --reference-repo: no official decoder
    assert all(len(d["seconds"]) == 1 for d in sampling["decoders"].values())
    assert [r["quant"] for r in report["fake_quant"]] == ["rtn", "ours"]
    (calib,) = report["calibration"]
    assert calib["rows"] == 2 and {"attn", "ffn"} <= set(calib["unit_kinds"])
    assert calib["capture_vs_fp_generation"] == pytest.approx(calib["capture_s"] / calib["fp_generation_s"])
    assert calib["score_s"] > 0
    assert calib["capture_s"] + calib["score_s"] + calib["fit_s"] == pytest.approx(calib["total_s"])
    for row in report["fake_quant"]:  # CPU seconds beside wall seconds, one per repetition
        assert len(row["fp"]["cpu_seconds"]) == len(row["fp"]["seconds"]) == 1
        assert row["cpu_slowdown_vs_fp"] == pytest.approx(row["fake_quant"]["median_cpu_s"] / row["fp"]["median_cpu_s"])
    table = (tmp_path / "bench_cpu.md").read_text()
    assert table.splitlines()[0] == markdown_table(report).splitlines()[0]
    assert "| var_digits | rtn | w4a4 |" in table and "| var_digits | ours | w4a4 |" in table
    assert "| official decoder s | varq decoder s | varq fast decoder s |" in table


def test_fp8_section_times_three_samplers_and_refuses_a_pair_it_cannot_serve(tmp_path, capsys):
    # On a CPU the FP8 GEMM is emulated (the time means nothing), but the section must build both backends from one
    # rtn model, time FP, fake and fp8 alternately and say which GEMM ran.
    with pytest.raises(SystemExit) as exc:
        main(["--models", "var_digits", "--fp8-bits", "w6a6", "--out", str(tmp_path / "refused")])
    assert exc.value.code == 2 and "--fp8-bits w6a6" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # not a bit-width label at all
        main(["--models", "var_digits", "--fp8-bits", "fp16", "--out", str(tmp_path / "refused")])
    assert exc.value.code == 2 and "--fp8-bits fp16" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    main(["--models", "var_digits", "--skip", "sampling", "fake_quant", "calibration", "metrics", "--fp8-emulated",
          "--reps", "1", "--no-warmup", "--batch-size", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert [r["bits"] for r in report["fp8"]] == ["w8a8", "w4a4"]
    for row in report["fp8"]:
        assert row["fp8_linears"] > 0 and row["fp8_tensor_cores"] is False
        assert row["fp8_vs_fake"] == pytest.approx(row["fake_quant"]["median_s"] / row["fp8"]["median_s"])
    assert "| var_digits | rtn | w8a8 | fp32 |" in (tmp_path / "bench_cpu.md").read_text()


class _SelfReference:
    """Stands in for the official sampler: varq's own sampler on a copy of the model, reached through ``var.head``
    like the official one (the bench hooks the head's output)."""

    def __init__(self, var, vqvae) -> None:
        self.var, self.vqvae = var, vqvae

    def __call__(self, label_B, seed, cfg, top_k, top_p):
        from varq.sample.sampler import generate

        return generate(self.var, self.vqvae, label_B, rng=torch.Generator().manual_seed(seed), cfg=cfg,
                        top_k=top_k, top_p=top_p)


def test_logit_check_is_zero_for_the_same_computation_and_sees_a_one_ulp_change():
    from tests.tiny import tiny_var, tiny_vqvae
    from varq.bench import _logit_diff_vs_official

    var, vqvae = tiny_var(), tiny_vqvae()
    other = copy.deepcopy(var)
    labels, kw, cpu = torch.tensor([0, 1]), dict(cfg=1.5, top_k=0, top_p=0.0), torch.device("cpu")
    assert _logit_diff_vs_official(var, vqvae, _SelfReference(other, vqvae), labels, kw, cpu, "fp32") == 0.0
    with torch.no_grad():
        other.head.bias[0] = torch.nextafter(other.head.bias[0], torch.tensor(1e9))
    diff = _logit_diff_vs_official(var, vqvae, _SelfReference(other, vqvae), labels, kw, cpu, "fp32")
    assert 0.0 < diff < 1e-5


def test_sampling_table_shows_the_decoders_alone_and_reads_older_results():
    timing = {"median_s": 2.0, "images_per_s": 2.0, "peak_memory_gib": None}
    row = {"model": "var_d16", "dtype": "bf16", "batch_size": 4, "varq_identical_to_reference_loop": True,
           "samplers": {"varq": timing, "official": {**timing, "median_s": 3.0}}, "speedup_vs_official": 1.5}
    old = markdown_table({"sampling": [row]})  # written before the fast decoder and the decoder timing existed
    assert "decoder s |" not in old and "| var_d16 | bf16 | 4 | 3.00 | 2.00 |" in old
    decoders = {"varq": {"median_s": 1.25}, "varq_fast": {"median_s": 0.75}, "official": {"median_s": 1.5}}
    new = markdown_table({"sampling": [{**row, "decoders": decoders}]})
    assert "| var_d16 | bf16 | 4 | 1.50 | 1.25 | 0.75 | – |" in new.splitlines()  # before eval.decoder=winograd
    with_winograd = markdown_table({"sampling": [{**row, "decoders": {**decoders, "varq_winograd": {"median_s": 0.5}},
                                                  "winograd_decoder_speedup_vs_official": 2.5}]})
    assert "| var_d16 | bf16 | 4 | 1.50 | 1.25 | 0.75 | 0.50 |" in with_winograd.splitlines()
    assert "| – | 2.50× | – |" in with_winograd
