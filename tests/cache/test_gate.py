"""Novelty gate: the numpy decision function equals sklearn's; persistence; novel vs familiar prompts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import OneClassSVM

from nirvana.cache.gate import GateModel, NoveltyGate
from tests.cache.helpers import at_similarity, unit


def _cluster(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    center = unit(rng)
    return center, np.stack([at_similarity(center, 0.8, rng) for _ in range(n)])


def test_decision_matches_sklearn_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    _, x = _cluster(rng, 200)
    gate = NoveltyGate(nu=0.1, gamma=2.0, min_samples=10)
    model = gate.fit(x)
    assert model is not None
    ref = OneClassSVM(kernel="rbf", nu=0.1, gamma=2.0).fit(x.astype(np.float64))
    probe = np.concatenate([x[:20], unit(rng, 20)])
    assert np.allclose(model.decision(probe), ref.decision_function(probe.astype(np.float64)), atol=1e-5)
    back = GateModel.from_bytes(model.to_bytes())
    assert np.allclose(back.decision(probe), model.decision(probe), atol=1e-6)
    assert (back.n_samples, back.gamma, back.threshold) == (200, 2.0, 0.0)


def test_flags_novel_prompts() -> None:
    rng = np.random.default_rng(1)
    center, x = _cluster(rng, 300)
    gate = NoveltyGate(nu=0.05, gamma=2.0, min_samples=10)
    model = gate.fit(x)
    familiar = [gate.decide(model, at_similarity(center, 0.85, rng)) for _ in range(30)]
    novel = [gate.decide(model, v) for v in unit(rng, 30)]
    assert sum(n for n, _ in familiar) <= 3
    assert all(n for n, _ in novel)
    assert all(s is not None and s < 0 for _, s in novel)
    assert gate.decide(None, x[0]) == (None, None)


def test_sampling_refit_and_validation() -> None:
    rng = np.random.default_rng(2)
    _, x = _cluster(rng, 120)
    gate = NoveltyGate(min_samples=50, max_samples=60, refit_growth=0.2)
    assert gate.fit(x[:49]) is None
    model = gate.fit(x)
    assert model is not None and model.n_samples == 120 and len(model.support_vectors) <= 60
    assert not gate.needs_refit(model, 130) and gate.needs_refit(model, 150) and gate.needs_refit(None, 60)
    assert gate.needs_refit(model, 10) and not gate.needs_refit(None, 10)
    with pytest.raises(ValueError, match="embedding dim"):
        model.decision(np.zeros((1, 10), np.float32))
    with pytest.raises(ValueError, match="nu"):
        NoveltyGate(nu=0)
    with pytest.raises(ValueError, match="gamma"):
        NoveltyGate(gamma=-1)
    with pytest.raises(ValueError, match="min_samples"):
        NoveltyGate(min_samples=100, max_samples=10)
