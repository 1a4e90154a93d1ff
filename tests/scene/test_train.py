"""``train_model`` writes a pipeline folder the engine loads, with the training target it declares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nirvana.engine.engine import DiffusionEngine
from nirvana.engine.loader import load_model
from nirvana.scene.train import pyramid_noise, scheduler_config, train_model, unet_config


def test_scheduler_config_rejects_unknown_prediction_type() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler_config("sample")


def test_unet_config_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        unet_config("v9")


@pytest.mark.parametrize(
    ("prediction_type", "arch", "pyramid"),
    [("v_prediction", "v1", 0.0), ("epsilon", "v3", 0.8), ("epsilon", "v4", 0.8)],
)
def test_few_steps_give_a_loadable_pipeline(tmp_path: Path, prediction_type: str, arch: str, pyramid: float) -> None:
    out = tmp_path / "model"
    summary = train_model(
        out,
        steps=3,
        batch_size=4,
        renders_per_scene=1,
        prompts_per_scene=1,
        threads=1,
        checkpoint_every=0,
        prediction_type=prediction_type,
        arch=arch,
        pyramid_discount=pyramid,
    )
    assert summary["prediction_type"] == prediction_type
    assert summary["arch"] == arch
    assert summary["pyramid_discount"] == pyramid
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == prediction_type
    engine = DiffusionEngine(load_model(str(out), device="cpu"))
    assert engine.c.scheduler.config.prediction_type == prediction_type
    # v3's global text path is part of the saved config, so the engine's plain loader rebuilds it.
    assert (engine.c.denoiser.unet.config.addition_embed_type == "text") == (arch in ("v3", "v4"))
    # v4's coordinate channels are declared in model_index.json and appended by the engine, not stored in states.
    assert engine.c.denoiser.coord_channels == (2 if arch == "v4" else 0)
    res = engine.generate(["a small blue square on a black background"], seeds=[0], steps=4, capture=[2])
    assert res.images.shape == (1, 3, 32, 32)
    assert torch.isfinite(res.images).all()
    assert res.states[0][0].latent.shape == (12, 16, 16)
    resumed = engine.generate(["a small blue square on a black background"], seeds=[0], start=res.states[0][0], steps=4)
    assert resumed.steps_run == 2


def test_pyramid_noise_has_unit_variance_and_low_frequency_energy() -> None:
    shape = (64, 3, 32, 32)
    plain = pyramid_noise(shape, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    noise = pyramid_noise(shape, 0.8, torch.Generator().manual_seed(0))
    assert noise.flatten(1).std(dim=1) == pytest.approx(torch.ones(64), abs=1e-4)
    # The per-image channel mean (what a background colour is) carries ~10× the energy of white noise.
    assert noise.mean(dim=(2, 3)).std() > 5 * plain.mean(dim=(2, 3)).std()


def test_pyramid_discount_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pyramid_discount"):
        train_model(tmp_path / "m", steps=1, pyramid_discount=1.0)
