"""Similarity → K: how many denoising steps a cached state may skip.

A table is data (JSON): ``reference_steps`` N₀ and rules ``(min_similarity, k)``. For a cosine similarity
``s`` the first rule (highest threshold first) with ``s > min_similarity`` gives K₀; a request of N steps gets
``K = floor(K₀ · N / N₀)``, capped at N − 1. No rule matching, or K < 1 after scaling, is a miss (K = 0).
The default is the paper's table (``nirvana/policies/paper.json``); calibration writes another file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def policies_dir() -> Path:
    """Directory of the packaged policy tables."""
    return Path(__file__).resolve().parents[1] / "policies"


@dataclass(frozen=True)
class Rule:
    min_similarity: float
    k: int


@dataclass(frozen=True)
class KPolicy:
    """An immutable similarity → K table.

    Invariants (checked at construction): at least one rule; thresholds strictly decreasing and within
    [-1, 1); K strictly decreasing along with them, ``1 <= K < reference_steps``.
    """

    rules: tuple[Rule, ...]
    reference_steps: int = 50
    name: str = "custom"
    model_key: str | None = None  # the model a calibrated table was measured on (None: any model)

    def __post_init__(self) -> None:
        if self.reference_steps < 2:
            raise ValueError(f"reference_steps must be >= 2, got {self.reference_steps}")
        if not self.rules:
            raise ValueError("rules must hold at least one (min_similarity, k) rule")
        prev: Rule | None = None
        for r in self.rules:
            if not (-1.0 <= r.min_similarity < 1.0) or math.isnan(r.min_similarity):
                raise ValueError(f"rules.min_similarity must be in [-1, 1), got {r.min_similarity}")
            if not 1 <= r.k < self.reference_steps:
                raise ValueError(f"rules.k must be in 1..{self.reference_steps - 1}, got {r.k}")
            if prev is not None and not (r.min_similarity < prev.min_similarity and r.k < prev.k):
                raise ValueError("rules must be ordered by strictly decreasing min_similarity and k")
            prev = r

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KPolicy:
        """Build from ``{"reference_steps": N, "rules": [{"min_similarity": s, "k": k}, ...]}``."""
        try:
            rules = tuple(Rule(float(r["min_similarity"]), int(r["k"])) for r in data["rules"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"policy table needs rules=[{{min_similarity, k}}, ...]: {e}") from e
        key = data.get("model_key")
        return cls(
            rules,
            int(data.get("reference_steps", 50)),
            str(data.get("name", "custom")),
            None if key is None else str(key),
        )

    @classmethod
    def from_file(cls, path: Path | str) -> KPolicy:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def paper(cls) -> KPolicy:
        """The NIRVANA table (N = 50): > 0.95 → 25, > 0.90 → 20, > 0.85 → 15, > 0.75 → 10, > 0.65 → 5."""
        return cls.from_file(policies_dir() / "paper.json")

    @classmethod
    def load(cls, path: Path | str | None, model_key: str | None = None) -> KPolicy:
        """``path`` if given, else the paper's table.

        Args:
            model_key: the served model's key; a table calibrated on another model is refused (its K values
                were measured on a different denoiser or scheduler and would serve wrong hits silently).

        Raises:
            ValueError: the table names another ``model_key``, naming both and the setting.
        """
        policy = cls.paper() if path is None else cls.from_file(path)
        if model_key is not None and policy.model_key is not None and policy.model_key != model_key:
            raise ValueError(
                f"cache_policy_table (NIRVANA_CACHE_POLICY_TABLE): {path} was calibrated on model_key "
                f"{policy.model_key!r}, the served model is {model_key!r}; recalibrate (`nirvana calibrate`) or "
                "use the paper's table"
            )
        return policy

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "reference_steps": self.reference_steps,
            "rules": [{"min_similarity": r.min_similarity, "k": r.k} for r in self.rules],
        }
        return out if self.model_key is None else {**out, "model_key": self.model_key}

    # ------------------------------------------------------------------ queries
    def scale(self, k_ref: int, num_steps: int) -> int:
        """K₀ of the reference schedule scaled to ``num_steps`` (floor; capped at ``num_steps - 1``)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return min(k_ref * num_steps // self.reference_steps, num_steps - 1)

    def k_for(self, similarity: float, num_steps: int | None = None) -> int:
        """Steps a state may skip for a prompt at cosine ``similarity`` (0 = miss).

        Raises:
            ValueError: ``similarity`` is NaN or outside [-1 - 1e-4, 1 + 1e-4] (rounding slack is clamped).
        """
        s = float(similarity)
        if math.isnan(s) or not -1.0001 <= s <= 1.0001:
            raise ValueError(f"similarity must be a cosine in [-1, 1], got {similarity}")
        n = self.reference_steps if num_steps is None else num_steps
        for r in self.rules:
            if s > r.min_similarity:
                return self.scale(r.k, n)
        return 0

    def cached_steps(self, num_steps: int | None = None) -> list[int]:
        """The step indices worth capturing for a ``num_steps`` run (ascending, each >= 1, deduplicated)."""
        n = self.reference_steps if num_steps is None else num_steps
        return sorted({k for k in (self.scale(r.k, n) for r in self.rules) if k >= 1})

    @property
    def min_similarity(self) -> float:
        """Below (or at) this similarity every lookup is a miss."""
        return self.rules[-1].min_similarity
