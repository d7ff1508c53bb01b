"""Building Infinity with released (here: saved random) weights or random ones."""

from __future__ import annotations

import pytest
import torch

from varq.models.bsq_vae import BSQVAE
from varq.models.checkpoint import CheckpointError
from varq.models.infinity import TextCond
from varq.models.infinity_factory import build_infinity_models
from varq.models.infinity_scales import custom_schedule

SCHEDULE = custom_schedule(((1, 1), (2, 2), (3, 3)))


def test_official_files_load_strictly_into_a_meta_built_model(tmp_path, monkeypatch):
    import varq.models.infinity_factory as factory

    # a small tokenizer stands in for the 110M one
    monkeypatch.setattr(factory, "build_bsq_vae", lambda d, seed=0: BSQVAE(d, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                                                           patch_size=2))
    model, vae = build_infinity_models("infinity_tiny", source="random", schedule=SCHEDULE, seed=3)
    torch.save(model.state_dict(), tmp_path / "infinity.pth")
    torch.save({"vae": vae.state_dict()}, tmp_path / "vae.pth")
    loaded, loaded_vae = build_infinity_models(
        "infinity_tiny", source="official", ckpt=str(tmp_path / "infinity.pth"), vae_ckpt=str(tmp_path / "vae.pth"),
        schedule=SCHEDULE,
    )
    assert not any(t.is_meta for t in list(loaded.state_dict().values()) + list(loaded.buffers()))
    text = TextCond(torch.randn(2, 4, 256), torch.tensor([4, 2]))
    x = torch.randn(2, loaded.L - 1, 32)
    with torch.no_grad():
        assert torch.equal(loaded(text, x), model(text, x))
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded_vae.state_dict().values()))


def test_missing_files_and_bad_sources_name_the_key(tmp_path):
    with pytest.raises(CheckpointError, match="model.vae_ckpt"):
        build_infinity_models("infinity_tiny", source="official", ckpt=str(tmp_path / "x.pth"))
    with pytest.raises(CheckpointError, match="model.ckpt"):
        build_infinity_models("infinity_tiny", source="official", ckpt=str(tmp_path / "x.pth"), vae_ckpt="v.pth")
    with pytest.raises(CheckpointError, match="model.source"):
        build_infinity_models("infinity_tiny", source="asset")
    with pytest.raises(CheckpointError, match="infinity_2b"):
        build_infinity_models("infinity_3b")
