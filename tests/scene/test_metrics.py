"""Probe metrics: Fréchet distance, adherence bookkeeping and the committed probe on real renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nirvana.config import bundled_probe_dir
from nirvana.scene.metrics import ProbeMetrics, frechet_distance
from nirvana.scene.probe import AttributeProbe
from nirvana.scene.world import Scene, render, split_scenes, to_array


def test_frechet_distance_properties() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + 3.0)
    assert shifted == pytest.approx(8 * 9.0, rel=0.05)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, rng.normal(size=(10, 4)))


def test_adherence_counts_unparsable_prompts_as_failures() -> None:
    m = ProbeMetrics(AttributeProbe())
    imgs = [render(Scene("circle", "red", "white", "small", "center"))]
    res = m.adherence(imgs, [None])
    assert res["adherence"] == 0.0 and res["ok"] == [False]


@pytest.mark.skipif(not (bundled_probe_dir() / "probe.safetensors").exists(), reason="probe weights not trained")
def test_committed_probe_reads_renders() -> None:
    m = ProbeMetrics(bundled_probe_dir())
    held = split_scenes()[1]
    x = torch.from_numpy(to_array([render(s, seed=99 + i) for i, s in enumerate(held)]))
    res = m.adherence(x, list(held))
    assert res["adherence"] >= 0.97, res["per_attribute"]
    # probe-FID of renders vs renders is small; vs noise it is large.
    y = torch.from_numpy(to_array([render(s, seed=7 + i) for i, s in enumerate(held)]))
    same = m.fid(x, y)
    noise = m.fid(x, torch.rand_like(x) * 2 - 1)
    assert same < noise / 10
