"""Every config option composes and validates; experiment presets compose; bad choices fail with the valid list."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import CONF_DIR, compose_cfg
from varq.compose import to_run_config
from varq.config import SUPPORTED_BITS
from varq.identity import run_id
from varq.quant.registry import available_methods


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_quant_yaml_is_a_registered_method_and_vice_versa():
    assert options("quant") == available_methods()


def test_bits_group_is_exactly_the_supported_set():
    assert sorted(options("bits")) == sorted(SUPPORTED_BITS)


@pytest.mark.parametrize("quant", options("quant"))
def test_every_method_validates(quant):
    cfg = to_run_config(compose_cfg(["model=var_tiny", f"quant={quant}", "bits=w4a4"]))
    assert cfg.quant.name == quant and len(run_id(cfg)) == 10


@pytest.mark.parametrize("model", options("model"))
def test_every_model_validates(model):
    assert to_run_config(compose_cfg([f"model={model}"])).model.name == model


@pytest.mark.parametrize("group", ["eval", "calib", "task", "logger"])
def test_every_option_of_the_other_groups_validates(group):
    for option in options(group):
        cfg = to_run_config(compose_cfg([f"{group}={option}"]))
        assert getattr(cfg, group).name == option


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_compose(experiment):
    cfg = to_run_config(compose_cfg([f"+experiment={experiment}"]))
    assert cfg.model.name.startswith("var_")


def test_sweep_values_in_presets_are_real_options():
    import yaml

    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
        for group, values in params.items():
            if "." in group:  # a value sweep such as calib.seed, not a config group
                continue
            for value in str(values).split(","):
                assert value in options(group), f"{path.name}: {group}={value} does not exist"


def test_run_id_ignores_paths_and_logging_but_not_the_method():
    a = to_run_config(compose_cfg(["paths.root=/a", "logger=none", "quant=rtn"]))
    b = to_run_config(compose_cfg(["paths.root=/b", "logger=wandb", "quant=rtn"]))
    c = to_run_config(compose_cfg(["quant=litevar"]))
    d = to_run_config(compose_cfg(["quant=rtn", "bits=w8a8"]))
    assert run_id(a) == run_id(b)
    assert len({run_id(a), run_id(c), run_id(d)}) == 3


def test_invalid_options_list_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["bits=w3a3"])
    text = str(err.value) + str(err.value.__cause__ or "")
    assert "w3a3" in text and "w4a4" in text and "w8a8" in text


def test_model_reconstruction_budget_yields_to_an_explicit_setting():
    assert to_run_config(compose_cfg(["model=var_digits", "quant=brecq"])).quant.iters == 300
    assert to_run_config(compose_cfg(["model=var_digits", "quant=brecq", "quant.iters=7"])).quant.iters == 7
    assert to_run_config(compose_cfg(["model=var_d16", "quant=ours"])).quant.iters == 5000


def test_model_budget_scales_the_learning_rate_unless_set():
    assert to_run_config(compose_cfg(["model=var_digits", "quant=ours"])).quant.lr == 1.5e-3
    assert to_run_config(compose_cfg(["model=var_digits", "quant=ours", "quant.lr=2e-4"])).quant.lr == 2e-4
    assert to_run_config(compose_cfg(["model=var_d16", "quant=brecq"])).quant.lr == 1e-4


def test_fp16_reference_does_not_depend_on_the_reconstruction_budget():
    from varq.pipeline import fp16_config

    a = to_run_config(compose_cfg(["quant=ours"]))
    b = to_run_config(compose_cfg(["quant=ours", "model.recon_iters=10", "model.recon_lr=0.1"]))
    assert run_id(fp16_config(a)) == run_id(fp16_config(b)) and run_id(a) != run_id(b)
