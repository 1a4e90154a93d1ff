"""``train_model`` writes a pipeline folder the engine loads, with the training target it declares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nirvana.engine.engine import DiffusionEngine
from nirvana.engine.loader import load_model
from nirvana.world.train import scheduler_config, train_model


def test_scheduler_config_rejects_unknown_prediction_type() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler_config("sample")


@pytest.mark.parametrize("prediction_type", ["v_prediction"])
def test_few_steps_give_a_loadable_pipeline(tmp_path: Path, prediction_type: str) -> None:
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
    )
    assert summary["prediction_type"] == prediction_type
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == prediction_type
    engine = DiffusionEngine(load_model(str(out), device="cpu"))
    assert engine.c.scheduler.config.prediction_type == prediction_type
    res = engine.generate(["a small blue square on a black background"], seeds=[0], steps=4)
    assert res.images.shape == (1, 3, 32, 32)
    assert torch.isfinite(res.images).all()
