"""Novelty gate: a one-class SVM over cached prompt embeddings predicts "no cached neighbour", so the vector
lookup can be skipped (the paper's gate).

A fit is exported as plain arrays (support vectors, dual coefficients, intercept, gamma) and scored in numpy,
so a model can be stored in the database (``cache_gate_models``) and loaded by every router without pickle.

Invariants:
    * ``decision(x) = Σ_i α_i · exp(-γ‖x − sv_i‖²) + b``: identical to sklearn's ``decision_function``.
    * ``novel`` ⇔ ``decision < threshold``; no model (too few samples) → ``novel is None`` (do the lookup).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np

# Shadow mode by default: on the full dreambot trace, enforcing the gate skipped 37 % of lookups (~9 ms each) but
# lost 33 % of the hits (steps saved 0.151 instead of 0.221, docs/BENCHMARKS.md) — a lost hit costs K denoising
# steps, a lookup a fraction of one. The decision is still computed and recorded per job.
DEFAULT_GATE_ENFORCE = False


@dataclass
class GateModel:
    """A fitted one-class SVM as arrays."""

    support_vectors: np.ndarray
    dual_coef: np.ndarray
    intercept: float
    gamma: float
    n_samples: int
    fitted_ts: float
    threshold: float = 0.0

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Decision values of rows of ``x`` (n, d); higher = more like the cache."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        sv = self.support_vectors
        if x.shape[1] != sv.shape[1]:
            raise ValueError(f"embedding dim must be {sv.shape[1]}, got {x.shape[1]}")
        d2 = (x * x).sum(1)[:, None] - 2.0 * x @ sv.T + (sv * sv).sum(1)[None, :]
        k = np.exp(-self.gamma * np.maximum(d2, 0.0))
        return np.asarray(k @ self.dual_coef + self.intercept, dtype=np.float64)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            support_vectors=self.support_vectors.astype(np.float32),
            dual_coef=self.dual_coef.astype(np.float64),
            scalars=np.array([self.intercept, self.gamma, self.n_samples, self.fitted_ts, self.threshold]),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GateModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            s = z["scalars"]
            return cls(
                support_vectors=z["support_vectors"],
                dual_coef=z["dual_coef"],
                intercept=float(s[0]),
                gamma=float(s[1]),
                n_samples=int(s[2]),
                fitted_ts=float(s[3]),
                threshold=float(s[4]),
            )


class NoveltyGate:
    """Fits and applies one-class SVMs.

    Args:
        nu: upper bound on the fraction of training embeddings treated as outliers (sklearn ``nu``).
        gamma: RBF width for unit vectors (‖x − y‖² = 2 − 2·cos); larger is more local.
        max_samples: embeddings sampled per fit.
        min_samples: fewer cached prompts than this → no model (the gate abstains).
        threshold: decision value below which a prompt is novel (0 = sklearn's ``predict == -1``).
        refit_growth: refit when the namespace's prompt count changed by this fraction since the last fit.
        reload_s: how often a router re-reads persisted models.
        seed: sampling seed.
    """

    def __init__(
        self,
        nu: float = 0.05,
        gamma: float = 2.0,
        max_samples: int = 2000,
        min_samples: int = 50,
        threshold: float = 0.0,
        refit_growth: float = 0.2,
        reload_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 < nu <= 1.0:
            raise ValueError(f"nu must be in (0, 1], got {nu}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if min_samples < 2 or max_samples < min_samples:
            raise ValueError(f"need 2 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
        if refit_growth < 0 or reload_s < 0:
            raise ValueError("refit_growth and reload_s must be >= 0")
        self.nu = nu
        self.gamma = gamma
        self.max_samples = max_samples
        self.min_samples = min_samples
        self.threshold = threshold
        self.refit_growth = refit_growth
        self.reload_s = reload_s
        self.seed = seed

    def fit(self, embeddings: np.ndarray, now: float | None = None) -> GateModel | None:
        """Fit on (a sample of) ``embeddings`` (n, d); ``None`` when n < ``min_samples``."""
        from sklearn.svm import OneClassSVM

        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
        if len(x) < self.min_samples:
            return None
        if len(x) > self.max_samples:
            idx = np.random.default_rng(self.seed).choice(len(x), self.max_samples, replace=False)
            x = x[idx]
        svm = OneClassSVM(kernel="rbf", nu=self.nu, gamma=self.gamma).fit(x.astype(np.float64))
        return GateModel(
            support_vectors=np.asarray(svm.support_vectors_, dtype=np.float32),
            dual_coef=np.asarray(svm.dual_coef_, dtype=np.float64).ravel(),
            intercept=float(np.asarray(svm.intercept_).ravel()[0]),
            gamma=float(self.gamma),
            n_samples=len(embeddings),
            fitted_ts=time.time() if now is None else now,
            threshold=self.threshold,
        )

    @staticmethod
    def decide(model: GateModel | None, embedding: np.ndarray) -> tuple[bool | None, float | None]:
        """(novel, decision score) of one embedding; (None, None) without a model."""
        if model is None:
            return None, None
        score = float(model.decision(embedding)[0])
        return score < model.threshold, score

    def needs_refit(self, model: GateModel | None, n_now: int) -> bool:
        """Whether the cache changed enough since ``model`` was fitted."""
        if n_now < self.min_samples:
            return model is not None
        if model is None:
            return True
        return abs(n_now - model.n_samples) > self.refit_growth * max(model.n_samples, 1)
