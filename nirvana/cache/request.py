"""What callers hand the approximate cache and get back: the reuse scope (:class:`Namespace`), a generation's
request (:class:`CacheRequest`) and a lookup's outcome (:class:`LookupResult`).

Invariants:
    * A ``Namespace`` is valid on construction (non-empty strings of at most 200 chars); entries are only reused
      within one namespace, and the opt-in shared pool is ``tenant=SHARED_TENANT``.
    * A ``CacheRequest`` is a ``nirvana.generation.GenerationRequest`` (checked on construction) plus where it may
      reuse states; :meth:`CacheRequest.exact_key` is the request's digest with the namespace's model_key and
      depends on nothing else (not the tenant, not the embedding): equal keys mean the same image.
    * A ``LookupResult`` with ``tier == "miss"`` has ``k == 0`` and no state or source; ``k <= k_policy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from nirvana.generation import GenerationRequest

SHARED_TENANT = "__shared__"
Tier = Literal["exact", "approximate", "miss"]


@dataclass(frozen=True)
class Namespace:
    """Reuse scope: states are only shared within one model_key (checkpoint × resolution × scheduler) and
    tenant. The opt-in shared pool is ``tenant=SHARED_TENANT``."""

    model_key: str
    tenant: str

    def __post_init__(self) -> None:
        for name in ("model_key", "tenant"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v) > 200:
                raise ValueError(f"namespace.{name} must be a non-empty string of at most 200 chars, got {v!r}")


@dataclass(frozen=True)
class CacheRequest(GenerationRequest):
    """A generation request (its fields first: ``CacheRequest(prompt, negative_prompt, seed, steps, guidance,
    width, height, namespace)``) in the namespace it may reuse states of, with its prompt's embedding if known."""

    namespace: Namespace
    embedding: np.ndarray | None = None

    @classmethod
    def of(cls, request: GenerationRequest, namespace: Namespace, embedding: np.ndarray | None = None) -> CacheRequest:
        return cls(**request.fields(), namespace=namespace, embedding=embedding)

    def exact_key(self) -> str:
        """Digest of (prompt, negative prompt, seed, steps, guidance, size, model_key)."""
        return self.digest(self.namespace.model_key)


@dataclass
class LookupResult:
    """Outcome of :meth:`ApproximateCache.lookup`.

    ``k`` is the step of the stored state to resume from (0 unless approximate); ``k_policy`` the K the table
    allowed for ``similarity`` (k ≤ k_policy). ``similarity`` is the best neighbour's, hit or not (None when
    no vector lookup ran). ``gate_novel``/``gate_score`` are the gate's verdict (None: no gate or no model).
    """

    tier: Tier
    k: int
    similarity: float | None
    source_prompt_id: int | None
    state_id: int | None
    image_uri: str | None
    gate_novel: bool | None
    gate_score: float | None
    lookup_ms: float
    k_policy: int = 0
    num_steps: int = 0
    image_blob_id: int | None = None
    gate_skipped_lookup: bool = False
    candidates: int = 0
    exact_key: str = ""
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def hit(self) -> bool:
        return self.tier != "miss"


def miss_result(req: CacheRequest, exact_key: str) -> LookupResult:
    """A miss for ``req`` (the starting point of every lookup)."""
    return LookupResult("miss", 0, None, None, None, None, None, None, 0.0, num_steps=req.steps, exact_key=exact_key)
