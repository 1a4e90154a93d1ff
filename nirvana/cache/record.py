"""The record path of the approximate cache: what :meth:`ApproximateCache.record` and
:meth:`ApproximateCache.record_virtual` do, around one shared bookkeeping function.

Both go through ``RecordPath._record_entry``: validate, take the hit's fields, ask the eviction policy to admit
the entry, build the prompt row and the entry's own state/image rows, and hand everything to
:meth:`nirvana.cache.index.CacheIndex.record` (ledger claim, rows, hit count, eviction accounting in one
transaction). They differ only in where the rows come from: ``record`` writes real latent and image objects
first (``_LatentBlobs``); ``record_virtual`` records byte sizes with no object (``_ByteSizes``, trace replays).

Invariants:
    * A hit is counted once per job id, by the ledger claim inside ``CacheIndex.record``; nothing here counts it.
    * Objects are written before the rows that make them visible, at keys derived from the job id and attempt;
      two attempts racing write different keys, and the loser's objects become orphans for ``sweep_orphans``.
    * An entry's own states are those at k > the hit's k (one per k); those at k ≤ hit.k borrow the source's.
    * The ``_job_seen`` read only spares object writes for a job already recorded; it never decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from nirvana.cache.eviction import EvictionPolicy
from nirvana.cache.index import CacheIndex
from nirvana.cache.index_rows import NewImage, NewPrompt, NewState, Space
from nirvana.cache.policy import KPolicy
from nirvana.cache.request import CacheRequest, LookupResult, Namespace
from nirvana.cache.store import LatentStore
from nirvana.engine.state import CapturedState


def _blob_owner(job_id: str, attempt: int) -> str:
    """What a recorded blob's key derives from: the job, and the attempt after the first (older keys kept)."""
    return job_id if attempt == 0 else f"{job_id}#a{attempt}"


class _EntryBlobs(Protocol):
    """Where a recorded entry's own state and image rows come from."""

    writes_objects: ClassVar[bool]

    def check(self, req: CacheRequest) -> None:
        """Validate what depends on the (already validated) request, whether the entry is admitted or not."""

    def rows(self, req: CacheRequest, space: Space, hit_k: int) -> tuple[list[NewState], NewImage | None]:
        """The entry's own states (k > ``hit_k``) and image (None: no image), objects written first if any."""
        ...


@dataclass
class _LatentBlobs:
    """A rendered generation's captured states and PNG: objects written to the store, rows pointing at them."""

    store: LatentStore
    codec: str
    job_id: str
    attempt: int
    states: list[CapturedState]
    image_png: bytes | None
    writes_objects: ClassVar[bool] = True

    def check(self, req: CacheRequest) -> None:
        """Nothing up front: the states are checked as they are written (only for an admitted entry)."""

    def rows(self, req: CacheRequest, space: Space, hit_k: int) -> tuple[list[NewState], NewImage | None]:
        owner = _blob_owner(self.job_id, self.attempt)
        new_states: list[NewState] = []
        seen: set[int] = set()
        for st in sorted(self.states, key=lambda s: s.step):
            if st.model_key != req.namespace.model_key:
                raise ValueError(f"states[].model_key must be {req.namespace.model_key!r}, got {st.model_key!r}")
            if st.num_steps != req.steps:
                raise ValueError(f"states[].num_steps must equal steps={req.steps}, got {st.num_steps}")
            if st.step <= hit_k or st.step in seen:
                continue
            seen.add(st.step)
            latent = st.latent.detach().to("cpu").float().numpy()
            ref = self.store.put_latent(
                LatentStore.state_key(space.model_key, space.tenant, owner, st.step),
                latent,
                self.codec,
                {"step": st.step, "num_steps": st.num_steps, "timestep": st.timestep},
            )
            new_states.append(
                NewState(
                    st.step,
                    st.num_steps,
                    float(st.timestep),
                    st.sigma,
                    st.scheduler_family,
                    list(latent.shape),
                    ref.uri,
                    ref.codec,
                    ref.bytes,
                    ref.checksum,
                )
            )
        image = None
        if self.image_png:
            ref = self.store.put_bytes(
                LatentStore.image_key(space.model_key, space.tenant, owner), self.image_png, "png"
            )
            image = NewImage(ref.uri, ref.bytes, ref.checksum)
        return new_states, image


@dataclass
class _ByteSizes:
    """A replayed generation: states at ``steps_k`` (default: the policy table's steps) of ``bytes_per_state``
    bytes each and an image of ``image_bytes`` (none if 0), with no object behind any of them."""

    policy: KPolicy
    bytes_per_state: int
    steps_k: list[int] | None
    image_bytes: int
    ks: list[int] = field(default_factory=list)
    writes_objects: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.bytes_per_state < 0 or self.image_bytes < 0:
            raise ValueError("bytes_per_state and image_bytes must be >= 0")

    def check(self, req: CacheRequest) -> None:
        ks = self.steps_k if self.steps_k is not None else self.policy.cached_steps(req.steps)
        self.ks = sorted(set(ks))
        for k in self.ks:
            if not 1 <= k < req.steps:
                raise ValueError(f"steps_k must be in 1..{req.steps - 1}, got {k}")

    def rows(self, req: CacheRequest, space: Space, hit_k: int) -> tuple[list[NewState], NewImage | None]:
        states = [
            NewState(k, req.steps, 0.0, None, "virtual", [], None, "virtual", self.bytes_per_state, None)
            for k in self.ks
            if k > hit_k
        ]
        return states, NewImage(None, self.image_bytes, None, "virtual") if self.image_bytes else None


class RecordPath:
    """The record half of :class:`nirvana.cache.core.ApproximateCache` (whose constructor sets the attributes
    below and which defines the request helpers declared here)."""

    index: CacheIndex
    store: LatentStore
    eviction: EvictionPolicy
    policy: KPolicy
    codec: str
    clock: Callable[[], float]

    if TYPE_CHECKING:

        def _space(self, ns: Namespace) -> Space: ...

        def _validate(self, req: CacheRequest) -> None: ...

        def _embedding_of(self, req: CacheRequest, hit: LookupResult | None = None) -> np.ndarray: ...

    def record(
        self,
        job_id: str,
        req: CacheRequest,
        states: list[CapturedState],
        image_png: bytes | None,
        hit: LookupResult | None,
        attempt: int = 0,
    ) -> dict[str, Any]:
        """Record a served generation (hits included); idempotent per ``job_id``.

        Counts the hit on the state it used (once per job), then, if the eviction policy admits it, stores the
        prompt, its image (exact tier) and its states: those at k > hit.k are its own (blobs written first, at
        keys derived from the job id and ``attempt``); those at k ≤ hit.k borrow the source prompt's blobs.
        States at k ≤ hit.k passed in are ignored. Returns what ``CacheIndex.record`` reports.

        Invariant: the ledger row (``cache_jobs``) is checked and inserted in the same transaction as the rows
        (``CacheIndex.record``); the ``_job_seen`` read before it only skips blob writes for a job already
        recorded. Two attempts racing both write blobs, at different keys (the attempt is in them), and only
        the ledger's winner makes its blobs visible; the loser's become orphans for ``sweep_orphans``.
        """
        blobs = _LatentBlobs(self.store, self.codec, job_id, attempt, states, image_png)
        return self._record_entry(job_id, req, hit, blobs)

    def record_virtual(
        self,
        job_id: str,
        req: CacheRequest,
        hit: LookupResult | None,
        bytes_per_state: int,
        steps_k: list[int] | None = None,
        image_bytes: int = 0,
    ) -> dict[str, Any]:
        """Like :meth:`record` without tensors (trace replays): rows for states at ``steps_k`` (default: the
        policy table's steps for ``req.steps``) above the hit's k, each accounting ``bytes_per_state`` bytes
        but with no object; an image of ``image_bytes`` bytes (none if 0). ``load_state`` of such a state is
        None."""
        blobs = _ByteSizes(self.policy, bytes_per_state, steps_k, image_bytes)
        return self._record_entry(job_id, req, hit, blobs)

    def _record_entry(
        self, job_id: str, req: CacheRequest, hit: LookupResult | None, blobs: _EntryBlobs
    ) -> dict[str, Any]:
        """The bookkeeping both record paths share: validate, admit, build the rows (``blobs`` writes any
        objects first) and record them with the ledger claim, hit count and byte accounting in one transaction
        (``CacheIndex.record``)."""
        if not job_id or len(job_id) > 200:
            raise ValueError("job_id must be a non-empty string of at most 200 chars")
        self._validate(req)
        now = self.clock()
        space = self._space(req.namespace)
        tier, sim, source, state_id, hit_k = self._hit_fields(hit)
        admit = self.eviction.admit(sim, tier)
        blobs.check(req)
        prompt: NewPrompt | None = None
        states: list[NewState] = []
        image: NewImage | None = None
        if admit and not (blobs.writes_objects and self._job_seen(job_id)):
            prompt = self._new_prompt(req, hit)
            states, image = blobs.rows(req, space, hit_k)
        return self.index.record(
            job_id=job_id,
            tier=tier,
            space=space,
            now=now,
            policy=self.eviction,
            hit_state_id=state_id,
            source_prompt_id=source,
            hit_k=hit_k,
            admit=prompt is not None,
            prompt=prompt,
            states=states,
            image=image,
        )

    def _new_prompt(self, req: CacheRequest, hit: LookupResult | None) -> NewPrompt:
        """The prompt row a recorded generation adds (embedding reused from the lookup when present)."""
        return NewPrompt(
            req.prompt,
            req.negative_prompt,
            self._embedding_of(req, hit),
            int(req.seed),
            int(req.steps),
            float(req.guidance),
            int(req.width),
            int(req.height),
            req.exact_key(),
        )

    @staticmethod
    def _hit_fields(hit: LookupResult | None) -> tuple[str, float | None, int | None, int | None, int]:
        """(tier, similarity, source prompt id, state id, k) of the hit a generation was served from."""
        tier = hit.tier if hit is not None else "miss"
        if hit is None or tier == "miss":
            return "miss", None, None, None, 0
        return tier, hit.similarity, hit.source_prompt_id, hit.state_id, hit.k if tier == "approximate" else 0

    def _job_seen(self, job_id: str) -> bool:
        with self.index.connection() as conn:
            return conn.execute("SELECT 1 FROM cache_jobs WHERE job_id = %s", (job_id,)).fetchone() is not None
