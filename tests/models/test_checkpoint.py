"""Checkpoint loading refuses early and clearly: missing files, wrong layouts, d36, and non-tensor pickles."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.test_var import tiny_pair
from varq.models.checkpoint import CheckpointError, load_checked, read_state_dict, resolve_checkpoint


def test_missing_explicit_path_names_file_and_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"/nonexistent\.pth.*model\.ckpt"):
        resolve_checkpoint("/nonexistent.pth", None, "var_d16.pth", None, "model.ckpt")


def test_not_found_anywhere_lists_what_was_tried(tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(None, str(tmp_path), "var_d16.pth", None, "model.ckpt")
    assert str(tmp_path / "var_d16.pth") in str(err.value) and "model.ckpt_dir" in str(err.value)


def test_ckpt_dir_is_searched(tmp_path):
    (tmp_path / "var_d16.pth").write_bytes(b"x")
    assert resolve_checkpoint(None, str(tmp_path), "var_d16.pth", None, "model.ckpt") == tmp_path / "var_d16.pth"


def test_round_trip_and_wrong_keys(tmp_path):
    var, _ = tiny_pair()
    path = tmp_path / "var.pth"
    torch.save(var.state_dict(), path)
    fresh, _ = tiny_pair(seed=1)
    load_checked(fresh, read_state_dict(path), path, "model.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), fresh.state_dict().values()))
    broken = var.state_dict()
    broken.pop("head.bias")
    broken["blocks.0.attn.bogus"] = torch.zeros(1)
    broken["word_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_checked(fresh, broken, path, "model.ckpt")
    msg = str(err.value)
    assert "head.bias" in msg and "blocks.0.attn.bogus" in msg and "word_embed.weight" in msg and "model.ckpt" in msg


def test_shared_adaln_d36_is_refused(tmp_path):
    var, _ = tiny_pair()
    state = var.state_dict()
    state["blocks.0.ada_gss"] = torch.zeros(1, 1, 6, var.C)
    with pytest.raises(CheckpointError, match="d36"):
        load_checked(var, state, tmp_path / "var_d36.pth", "model.ckpt")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_arbitrary_pickles_are_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(path)
    path2 = tmp_path / "nested.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path2)
    with pytest.raises(CheckpointError, match="flat state dict"):
        read_state_dict(path2)


def test_cli_fails_fast_on_missing_checkpoint():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "varq.run", "model=var_d16", "model.ckpt=/nonexistent.pth",
                           "paths.root=/tmp/varq-test-ckpt"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "/nonexistent.pth" in proc.stderr and "model.ckpt" in proc.stderr


def test_models_package_exports_the_design_contract():
    from varq.models import build_var, build_vqvae
    from varq.models.build import build_var as direct_var
    from varq.models.build import build_vqvae as direct_vqvae

    assert build_var is direct_var and build_vqvae is direct_vqvae
