"""Shared fixtures: compose real Hydra configs from varq/conf/ and point every artifact at tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CONF_DIR = Path(__file__).resolve().parents[1] / "varq" / "conf"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def run_config(tmp_path):
    """run_config(*overrides) → a validated RunConfig whose outputs live under tmp_path."""
    from varq.compose import to_run_config

    def make(*overrides: str):
        base = [f"paths.root={tmp_path}/runs", f"paths.cache={tmp_path}/cache"]
        return to_run_config(compose_cfg(base + list(overrides)))

    return make


@pytest.fixture
def count_batches(monkeypatch):
    """Batch indices the class-conditional task actually samples (to tell a resumed stage from a regenerated one)."""
    from varq.sample.tasks import ClassCondTask

    calls: list[int] = []
    real = ClassCondTask.generate_batch

    def counting(self, var, vqvae, plan, cfg, device):
        calls.append(plan.index)
        return real(self, var, vqvae, plan, cfg, device)

    monkeypatch.setattr(ClassCondTask, "generate_batch", counting)
    return calls
