"""The approximate-cache facade: exact tier → novelty gate → pgvector nearest → K policy → stored state.

Typical router/worker flow::

    cache = ApproximateCache.from_settings(get_settings())
    hit = cache.lookup(req)                       # does not count the hit
    if hit.tier == "exact": png = cache.load_image(hit)
    elif hit.tier == "approximate": state = cache.load_state(hit)   # None → treat as a miss
    ... render (from state at hit.k, or from noise) ...
    cache.record(job_id, req, captured_states, png, hit)            # idempotent per job_id; counts the hit
    cache.evict_to_budget()                                         # periodically (beat)

Here: construction, the lookup path (exact tier, gate, nearest, K), the reads of what a hit points at, and
maintenance. The record path (``record``, ``record_virtual``) is :class:`nirvana.cache.record.RecordPath`, which
``ApproximateCache`` extends; the request/result types live in :mod:`nirvana.cache.request` and are re-exported
here, so ``from nirvana.cache.core import Namespace, CacheRequest, LookupResult, SHARED_TENANT`` keeps working.

Invariants:
    * Entries are only reused within one ``Namespace`` (model_key × tenant) and embedding space.
    * ``lookup`` never writes; ``record`` is the only place a hit is counted, exactly once per job id.
    * Blobs are written before the rows that make them visible and deleted after the rows that referenced
      them; objects left behind by crashes are removed by ``sweep_orphans`` (after a grace period).
    * A state or image that vanished, is truncated or corrupt is a miss (``None``), never an exception;
      corrupt rows are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nirvana.cache.embedder import Embedder, MiniLMEmbedder, normalize
from nirvana.cache.eviction import (
    DEFAULT_HALF_LIFE_S,
    DEFAULT_IMAGE_BUDGET_FRACTION,
    DEFAULT_MIN_STATES_PER_PROMPT,
    EvictionPolicy,
    make_policy,
)
from nirvana.cache.gate import DEFAULT_GATE_ENFORCE, GateModel, NoveltyGate
from nirvana.cache.index import DEFAULT_EXACT_SCAN_MAX_ROWS, CacheIndex, Space, configure_connection
from nirvana.cache.policy import KPolicy
from nirvana.cache.record import RecordPath
from nirvana.cache.request import SHARED_TENANT, CacheRequest, LookupResult, Namespace, Tier, miss_result
from nirvana.cache.store import BlobCorrupt, BlobMissing, BlobUnavailable, LatentStore
from nirvana.engine.state import CapturedState

log = logging.getLogger(__name__)

__all__ = ["SHARED_TENANT", "ApproximateCache", "CacheRequest", "LookupResult", "Namespace", "Tier"]


class ApproximateCache(RecordPath):
    """Approximate cache of intermediate latents (NIRVANA) with an exact tier, a novelty gate and eviction.

    Args:
        conninfo_or_pool: a ``postgresql://`` URL (a pool is created and owned) or a psycopg
            ``ConnectionPool`` (best created with ``configure=nirvana.cache.index.configure_connection``).
        store: where latents and images live.
        embedder: prompt embedder (its ``space`` is part of the namespace).
        policy: similarity → K table.
        eviction: policy name (``ours``, ``paper``, ``lru``, ``lfu``, ``fifo``) or instance.
        gate: novelty gate, or None to always look up.
        budget_bytes: stored bytes (states + images) that ``evict_to_budget`` enforces over all tenants.
        tenant_budget_bytes: stored bytes each tenant (``Namespace.tenant``, every model_key of it, the shared
            pool's ``__shared__`` included) may keep; ``evict_to_budget`` first brings each tenant over it back
            under it by evicting only that tenant's entries, then enforces ``budget_bytes``. 0: none.
        min_states_per_prompt: floor per prompt for ``ours`` (ignored by the others, and when ``eviction`` is
            an instance).
        image_budget_fraction: share of ``budget_bytes`` the exact tier's images may keep when eviction runs
            (``ours`` only: images beyond it go first, least recently used; None: no cap; ignored when
            ``eviction`` is an instance).
        codec: codec for new states.
        half_life_s: half-life of the decayed use counts of ``ours`` (ignored by the others, and when
            ``eviction`` is an instance).
        ef_search: HNSW candidate list size per query.
        exact_tier: serve identical requests from the stored final image.
        gate_enforce: skip the lookup when the gate says novel; False (default, ``gate.DEFAULT_GATE_ENFORCE``) =
            shadow mode: the decision is recorded, the lookup still runs, so the hits the gate would lose can
            be counted.
        candidates: nearest prompts examined per lookup (a neighbour whose states were all evicted is
        skipped).
        max_scan_tuples: bound on pgvector's iterative scan under the namespace filter.
        exact_scan_max_rows: namespaces of at most this many prompts are searched exactly instead of through
            the filtered HNSW scan (0: always HNSW); see ``CacheIndex``.
        clock: seconds; eviction scores use it (a trace replay passes the trace's clock).
        max_prompt_chars: longest accepted prompt.
    """

    def __init__(
        self,
        conninfo_or_pool: Any,
        store: LatentStore,
        embedder: Embedder,
        policy: KPolicy,
        eviction: str | EvictionPolicy = "ours",
        gate: NoveltyGate | None = None,
        budget_bytes: int = 2 * 1024**3,
        min_states_per_prompt: int = DEFAULT_MIN_STATES_PER_PROMPT,
        codec: str = "fp16-zstd",
        ef_search: int = 100,
        exact_tier: bool = True,
        *,
        gate_enforce: bool = DEFAULT_GATE_ENFORCE,
        candidates: int = 4,
        max_scan_tuples: int = 20000,
        clock: Callable[[], float] = time.time,
        max_prompt_chars: int = 1000,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
        pool_size: int = 4,
        image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION,
        tenant_budget_bytes: int = 0,
        exact_scan_max_rows: int = DEFAULT_EXACT_SCAN_MAX_ROWS,
    ) -> None:
        from nirvana.cache.store import CODECS

        if codec not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if tenant_budget_bytes < 0:
            raise ValueError(f"tenant_budget_bytes must be >= 0, got {tenant_budget_bytes}")
        if not 1 <= ef_search <= 1000:
            raise ValueError(f"ef_search must be in 1..1000, got {ef_search}")
        if not 1 <= candidates <= 100:
            raise ValueError(f"candidates must be in 1..100, got {candidates}")
        self._owns_pool = isinstance(conninfo_or_pool, str)
        if isinstance(conninfo_or_pool, str):
            if not conninfo_or_pool:
                raise ValueError("database url must be non-empty")
            from psycopg_pool import ConnectionPool

            self.pool: Any = ConnectionPool(
                conninfo_or_pool,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True},
                configure=configure_connection,
                open=True,
                name="nirvana-cache",
            )
        else:
            self.pool = conninfo_or_pool
        self.index = CacheIndex(self.pool, exact_scan_max_rows=exact_scan_max_rows)
        self.store = store
        self.embedder = embedder
        self.policy = policy
        self.eviction = (
            eviction
            if isinstance(eviction, EvictionPolicy)
            else make_policy(
                eviction,
                min_states_per_prompt=min_states_per_prompt,
                half_life_s=half_life_s,
                image_budget_fraction=image_budget_fraction,
            )
        )
        self.gate = gate
        self.budget_bytes = budget_bytes
        self.tenant_budget_bytes = tenant_budget_bytes
        self.codec = codec
        self.ef_search = ef_search
        self.exact_tier = exact_tier
        self.gate_enforce = gate_enforce
        self.candidates = candidates
        self.max_scan_tuples = max_scan_tuples
        self.clock = clock
        self.max_prompt_chars = max_prompt_chars
        self._gate_cache: dict[Space, tuple[GateModel | None, float]] = {}
        if embedder.dim != 384:
            self.index.ensure_vector_index(embedder.dim)

    @classmethod
    def from_settings(cls, settings: Any, embedder: Embedder | None = None, **kwargs: Any) -> ApproximateCache:
        """Build from :class:`nirvana.config.Settings` (``database_url`` must be set; ``nirvana up`` sets
        it)."""
        if not settings.database_url:
            raise ValueError("database_url must be set (NIRVANA_DATABASE_URL; `nirvana up` starts an embedded one)")
        opts: dict[str, Any] = {
            "eviction": settings.cache_policy,
            "gate": NoveltyGate() if settings.cache_novelty_gate else None,
            "gate_enforce": settings.cache_gate_enforce,
            "budget_bytes": settings.cache_budget_bytes,
            "tenant_budget_bytes": settings.cache_tenant_budget_bytes,
            "exact_scan_max_rows": settings.cache_exact_scan_max_rows,
            "min_states_per_prompt": settings.cache_min_states_per_prompt,
            "image_budget_fraction": settings.cache_image_budget_fraction,
            "half_life_s": settings.cache_half_life_s,
            "codec": settings.cache_codec,
            "ef_search": settings.cache_ef_search,
            "exact_tier": settings.cache_exact_tier,
            "max_prompt_chars": settings.max_prompt_chars,
        }
        opts.update(kwargs)
        return cls(
            settings.database_url,
            LatentStore.from_settings(settings),
            embedder or MiniLMEmbedder(),
            KPolicy.load(settings.cache_policy_table),
            **opts,
        )

    def close(self) -> None:
        """Close the pool if this cache created it."""
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> ApproximateCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _space(self, ns: Namespace) -> Space:
        return Space(ns.model_key, ns.tenant, self.embedder.space, self.embedder.dim)

    def _validate(self, req: CacheRequest) -> None:
        if not isinstance(req.namespace, Namespace):
            raise ValueError("namespace must be a Namespace")
        # The request checked its fields' hard limits when it was built (GenerationRequest); this cache's own
        # prompt limit is checked here.
        for name in ("prompt", "negative_prompt"):
            if len(getattr(req, name)) > self.max_prompt_chars:
                raise ValueError(f"{name} must be a string of at most {self.max_prompt_chars} chars")

    def _embedding_of(self, req: CacheRequest, hit: LookupResult | None = None) -> np.ndarray:
        if req.embedding is not None:
            e = np.asarray(req.embedding, dtype=np.float32).ravel()
        elif hit is not None and hit.embedding is not None:
            e = np.asarray(hit.embedding, dtype=np.float32).ravel()
        else:
            e = self.embed([req.prompt])[0]
        if e.shape[0] != self.embedder.dim or not np.isfinite(e).all():
            raise ValueError(f"embedding must be {self.embedder.dim} finite floats, got shape {e.shape}")
        return normalize(e)[0]

    def embed(self, prompts: list[str]) -> np.ndarray:
        """(n, dim) unit-norm float32 embeddings of ``prompts``."""
        return self.embedder.embed(prompts)

    def _gate_model(self, space: Space) -> GateModel | None:
        assert self.gate is not None
        cached = self._gate_cache.get(space)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.gate.reload_s:
            return cached[0]
        data = self.index.load_gate(space)
        model = GateModel.from_bytes(data) if data is not None else None
        self._gate_cache[space] = (model, now)
        return model

    # ------------------------------------------------------------------ lookup
    def lookup(self, req: CacheRequest) -> LookupResult:
        """Exact tier → gate → nearest cached prompts in the namespace → K → largest stored k ≤ K.

        Does not count the hit (``record`` does, once per job). Never raises for cache contents; raises
        ``ValueError`` for an invalid request.
        """
        t0 = time.perf_counter()
        self._validate(req)
        space = self._space(req.namespace)
        ek = req.exact_key()
        res = miss_result(req, ek)
        if self.exact_tier:
            m = self.index.exact_match(space, ek)
            if m is not None:
                res.tier, res.source_prompt_id, res.image_uri = "exact", int(m["prompt_id"]), m["uri"]
                res.image_blob_id, res.similarity = int(m["blob_id"]), 1.0
                res.lookup_ms = (time.perf_counter() - t0) * 1000
                return res
        emb = self._embedding_of(req)
        res.embedding = emb
        if self.gate is not None:
            res.gate_novel, res.gate_score = self.gate.decide(self._gate_model(space), emb)
            if res.gate_novel and self.gate_enforce:
                res.gate_skipped_lookup = True
                res.lookup_ms = (time.perf_counter() - t0) * 1000
                return res
        cands = self.index.nearest(
            space, emb, ef_search=self.ef_search, limit=self.candidates, max_scan_tuples=self.max_scan_tuples
        )
        res.candidates = len(cands)
        if cands:
            res.similarity = cands[0][1]
            res.k_policy = self.policy.k_for(cands[0][1], req.steps)
        allowed = [(pid, sim, self.policy.k_for(sim, req.steps)) for pid, sim in cands]
        allowed = [a for a in allowed if a[2] > 0]
        usable = self.index.usable_states([a[0] for a in allowed], req.steps)
        for pid, sim, k_max in allowed:
            fits = [(sid, k) for sid, k in usable.get(pid, []) if k <= k_max]
            if fits:
                sid, k = fits[-1]
                res.tier, res.k, res.k_policy, res.similarity = "approximate", k, k_max, sim
                res.source_prompt_id, res.state_id = pid, sid
                break
        res.lookup_ms = (time.perf_counter() - t0) * 1000
        return res

    # ------------------------------------------------------------------ reads
    def load_state(self, result: LookupResult) -> CapturedState | None:
        """The state an approximate hit points at, or None (a miss) if its row or object vanished, or the
        object is truncated/corrupt (then its rows are dropped) or unreadable right now, or the state is
        virtual."""
        if result.tier != "approximate" or result.state_id is None:
            return None
        row = self.index.state_row(result.state_id)
        if row is None:
            log.info("state %s evicted before it was read: miss", result.state_id)
            return None
        if row.uri is None:
            return None
        try:
            x, _ = self.store.get_latent(row.uri, row.checksum)
            if list(x.shape) != list(row.shape):
                raise BlobCorrupt(f"{row.uri}: shape {list(x.shape)} != row shape {row.shape}")
        except (BlobMissing, BlobCorrupt) as e:
            log.warning("state %s unusable (%s: %s): miss, row dropped", row.state_id, type(e).__name__, e)
            uri = self.index.drop_blob(row.blob_id)
            if uri is not None and isinstance(e, BlobCorrupt):
                self.store.delete([uri])
            return None
        except BlobUnavailable as e:
            log.warning("state %s unreadable now (%s): miss", row.state_id, e)
            return None
        import torch

        return CapturedState(
            latent=torch.from_numpy(x),
            step=row.k,
            num_steps=row.num_steps,
            timestep=row.timestep,
            scheduler_family=row.scheduler_family,
            model_key=row.model_key,
            sigma=row.sigma,
            meta={"state_id": row.state_id, "prompt_id": row.prompt_id, "codec": row.codec},
        )

    def load_image(self, result: LookupResult) -> bytes | None:
        """PNG bytes of an exact hit, or None (a miss) when gone, corrupt (row dropped), unreadable or
        virtual."""
        if result.tier != "exact" or result.image_blob_id is None:
            return None
        ref = self.index.image_blob(result.image_blob_id)
        if ref is None or ref[0] is None:
            return None
        uri, check = ref[0], ref[1]
        try:
            return self.store.get_bytes(uri, check)
        except (BlobMissing, BlobCorrupt) as e:
            log.warning("image blob %s unusable (%s): miss, row dropped", result.image_blob_id, e)
            self.index.drop_blob(result.image_blob_id)
            if isinstance(e, BlobCorrupt):
                self.store.delete([uri])
            return None
        except BlobUnavailable as e:
            log.warning("image blob %s unreadable now (%s): miss", result.image_blob_id, e)
            return None

    # ------------------------------------------------------------------ maintenance
    def evict_to_budget(self, batch: int = 2000, pace: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Evict (policy order) until every tenant stores ≤ ``tenant_budget_bytes`` (if set) — each tenant over
        it losing only its own entries — and all together ≤ ``budget_bytes``; rows first, then objects, in
        transactions of at most ``batch`` entries, ``pace(seconds)`` called after each.
        Returns counts/bytes (``tenants``: bytes freed per tenant that was over its budget)."""
        res = self.index.evict_to_budget(
            self.eviction,
            self.budget_bytes,
            self.clock(),
            batch=batch,
            tenant_budget_bytes=self.tenant_budget_bytes,
            pace=pace,
        )
        uris = res.pop("uris")
        res["objects_deleted"] = self.store.delete(uris)
        res["policy"] = self.eviction.name
        return res

    def sweep_orphans(self, min_age_s: float = 3600.0, shards: Sequence[str] | None = None) -> int:
        """Delete stored objects no row references, older than ``min_age_s`` (so in-flight writes, whose rows
        come after their objects, are spared). ``shards`` (two hex digits each: the first byte of the job token
        in every key) limits the listing to those slices of the store — the maintenance task sweeps a few per
        run. Returns how many were deleted."""
        if min_age_s < 0:
            raise ValueError(f"min_age_s must be >= 0, got {min_age_s}")
        candidates: list[str] = []
        for shard in shards if shards is not None else [None]:
            candidates += self.store.iter_objects(min_age_s, shard=shard)
        if not candidates:
            return 0
        known = self.index.known_among(candidates)
        return self.store.delete([u for u in candidates if u not in known])

    def prune_ledger(self, older_than_s: float = 7 * 86400.0) -> int:
        """Forget job ids recorded longer ago than ``older_than_s`` (must exceed any redelivery delay)."""
        return self.index.prune_ledger(older_than_s)

    def refit_gate(self, force: bool = False) -> dict[str, Any]:
        """Refit each namespace's gate whose prompt count changed enough (or all with ``force``); persist
        them."""
        out: dict[str, Any] = {"fitted": 0, "removed": 0, "unchanged": 0, "namespaces": 0}
        if self.gate is None:
            return out
        for space, n in self.index.namespaces():
            if space.embed_space != self.embedder.space:
                continue
            out["namespaces"] += 1
            data = self.index.load_gate(space)
            current = GateModel.from_bytes(data) if data is not None else None
            if not force and not self.gate.needs_refit(current, n):
                out["unchanged"] += 1
                continue
            model = self.gate.fit(self.index.sample_embeddings(space, self.gate.max_samples), now=self.clock())
            if model is not None:
                model.n_samples = n
            self.index.save_gate(space, n, self.clock(), model.to_bytes() if model is not None else None)
            self._gate_cache.pop(space, None)
            out["fitted" if model is not None else "removed"] += 1
        return out

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """Counts and bytes (optionally of one tenant), with the budget and policy in force."""
        s = self.index.stats(tenant)
        s.update(
            budget_bytes=self.budget_bytes,
            tenant_budget_bytes=self.tenant_budget_bytes,
            policy=self.eviction.name,
            codec=self.codec,
        )
        return s
