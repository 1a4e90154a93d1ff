"""The typed plan from router to renderer.

The router decides a :class:`CachePlan` (tier, source state and its K, the steps to capture) and stores it on the
job row (``JobStore.set_plan``); the render worker claims the job and gets a :class:`RenderPlan` back
(``JobStore.claim_render``): the request, its cache namespace and the router's decision, typed. Job rows no
longer travel as ``dict[str, Any]`` on this path.

Invariants:
    * ``capture_steps`` come from the cache's K policy (``KPolicy.cached_steps(steps)``), the function the lookup
      scales K with, so every state the worker stores is one some lookup can ask for (None only for rows routed
      before the column existed).
    * ``source`` is set exactly when ``tier == "approximate"``.
    * A plan is immutable; the renderer downgrades a hit whose state cannot be loaded by building a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from nirvana.cache.core import SHARED_TENANT, CacheRequest, LookupResult, Namespace
from nirvana.generation import GenerationRequest

Tier = Literal["miss", "approximate", "exact"]


@dataclass(frozen=True)
class SourceState:
    """The cached state an approximate hit resumes from.

    Attributes:
        k: steps the hit skips (the stored state's step, ≤ ``k_policy``).
        k_policy: K the similarity→K table asked for.
        state_id, source_prompt_id: cache rows of the state and of the prompt that produced it.
        source_job_id: the job that produced it, only when it is the requester's own.
    """

    k: int
    k_policy: int
    similarity: float | None
    state_id: int | None
    source_prompt_id: int | None
    source_job_id: str | None = None


@dataclass(frozen=True)
class CachePlan:
    """What the router decided for one job (``JobStore.set_plan`` stores it)."""

    tier: Tier
    capture_steps: tuple[int, ...] | None = ()
    source: SourceState | None = None
    similarity: float | None = None
    lookup_ms: float | None = None
    gate_novel: bool | None = None
    exact_key: str | None = None
    embedding: np.ndarray | None = None
    image_blob_id: int | None = None

    def __post_init__(self) -> None:
        if (self.tier == "approximate") != (self.source is not None):
            raise ValueError(f"plan: an approximate tier needs a source state and only it (tier={self.tier!r})")


@dataclass(frozen=True)
class RenderPlan:
    """Everything a render worker needs for one job: the request in the cache's terms (with its namespace and
    embedding), the router's plan, the attempt."""

    job_id: str
    tenant: str
    attempts: int
    render_queue: str
    cache_mode: str
    request: CacheRequest
    plan: CachePlan

    @property
    def tier(self) -> Tier:
        return self.plan.tier

    @classmethod
    def from_row(cls, row: Mapping[str, Any], shared_pool: bool) -> RenderPlan:
        """The plan of a claimed job row (``capture_steps`` None: routed before the column existed)."""
        tier: Tier = row["tier"] if row["tier"] in ("approximate", "exact") else "miss"
        source = None
        if tier == "approximate":
            source = SourceState(
                k=int(row["k"] or 0),
                k_policy=int(row["k_policy"] or 0),
                similarity=row["similarity"],
                state_id=row["state_id"],
                source_prompt_id=row["source_prompt_id"],
                source_job_id=row.get("source_job_id"),
            )
        caps = row.get("capture_steps")
        request = cache_request(row, shared_pool)
        return cls(
            job_id=str(row["id"]),
            tenant=str(row["tenant"]),
            attempts=int(row["attempts"]),
            render_queue=str(row["render_queue"]),
            cache_mode=str(row["cache_mode"]),
            request=request,
            plan=CachePlan(
                tier=tier,
                capture_steps=None if caps is None else tuple(int(k) for k in caps),
                source=source,
                similarity=row["similarity"],
                lookup_ms=row["lookup_ms"],
                gate_novel=row["gate_novel"],
                exact_key=row["exact_key"],
                embedding=request.embedding,
                image_blob_id=row["image_blob_id"],
            ),
        )

    def as_miss(self) -> RenderPlan:
        """The same job planned as a miss (its source state could not be loaded)."""
        return replace(self, plan=replace(self.plan, tier="miss", source=None))

    def lookup(self) -> LookupResult | None:
        """The router's decision in the cache's terms (what ``load_state`` and ``record`` take); None = miss."""
        p, s = self.plan, self.plan.source
        if p.tier == "miss":
            return None
        return LookupResult(
            tier=p.tier,
            k=0 if s is None else s.k,
            similarity=p.similarity,
            source_prompt_id=None if s is None else s.source_prompt_id,
            state_id=None if s is None else s.state_id,
            image_uri=None,
            gate_novel=p.gate_novel,
            gate_score=None,
            lookup_ms=float(p.lookup_ms or 0.0),
            k_policy=0 if s is None else s.k_policy,
            num_steps=self.request.steps,
            image_blob_id=p.image_blob_id,
            exact_key=p.exact_key or "",
        )


def cache_request(job: Mapping[str, Any], shared_pool: bool) -> CacheRequest:
    """The cache's view of a job row. Namespace: the job's model_key × the cache tenant chosen when the job was
    created (its tenant, or the shared pool when the tenant opted in; ``shared_pool`` only for older rows)."""
    emb = job.get("embedding")
    tenant = job.get("cache_tenant") or (SHARED_TENANT if shared_pool else job["tenant"])
    return CacheRequest.of(
        GenerationRequest.from_row(job),
        Namespace(job["model_key"], tenant),
        embedding=None if emb is None else np.frombuffer(bytes(emb), dtype=np.float32).copy(),
    )
