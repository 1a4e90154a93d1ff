"""Small builders shared by the cache tests (real components only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nirvana.cache.core import ApproximateCache, CacheRequest, Namespace
from nirvana.cache.embedder import MiniLMEmbedder
from nirvana.cache.policy import KPolicy
from nirvana.cache.store import LatentStore
from nirvana.engine.state import CapturedState

DIM = 384


def unit(rng: np.random.Generator, n: int | None = None, d: int = DIM) -> np.ndarray:
    x = rng.normal(size=(n or 1, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x if n is not None else x[0]


def at_similarity(v: np.ndarray, sim: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine with unit ``v`` is exactly ``sim`` (up to float32 rounding)."""
    u = rng.normal(size=v.shape).astype(np.float64)
    u -= u.dot(v) * v
    u /= np.linalg.norm(u)
    return (sim * v.astype(np.float64) + np.sqrt(max(0.0, 1 - sim * sim)) * u).astype(np.float32)


def make_cache(url: str, store: LatentStore, **kwargs: Any) -> ApproximateCache:
    """A cache whose embedder is never loaded as long as requests carry embeddings."""
    kwargs.setdefault("pool_size", 2)
    return ApproximateCache(url, store, MiniLMEmbedder(), KPolicy.paper(), **kwargs)


def request(
    emb: np.ndarray,
    ns: Namespace,
    prompt: str = "a red cube on grass",
    seed: int = 1,
    steps: int = 50,
    **kw: Any,
) -> CacheRequest:
    return CacheRequest(prompt, kw.pop("negative_prompt", ""), seed, steps, kw.pop("guidance", 7.0),
                        kw.pop("width", 32), kw.pop("height", 32), ns, embedding=emb)  # fmt: skip


def states(model_key: str, ks: list[int], steps: int = 50, seed: int = 0, shape=(3, 8, 8)) -> list[CapturedState]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return [
        CapturedState(torch.randn(*shape, generator=g), k, steps, float(1000 - 20 * k), "ddim", model_key) for k in ks
    ]
