"""Eviction policies as pure bookkeeping: what a state's counters become on put and on hit, and the order in
which states leave when stored bytes exceed the budget.

The same orders are expressed in SQL (``sql_key_terms``) so the database applies them atomically under
concurrent workers (``nirvana/cache/index.py``); ``evict_candidates`` applies them in memory (trace replays,
tests). A test checks that both orders agree.

Counters kept for every state whatever the policy (so the policy can be switched without a migration):
    * ``hits``: raw hit count; ``k × hits`` is the paper's LCBFU score.
    * ``dhits`` as of ``dhits_ts``: exponentially decayed use count with half-life ``half_life_s``; a put
      counts as ``insert_credit`` uses. Its value at time t is ``dhits · 2^(-(t - dhits_ts)/half_life_s)``.
    * ``created_ts``, ``last_used_ts`` (put or hit).

Policies (ascending key = evicted first):
    * ``paper``: LCBFU, key (k × hits, created_ts): new states enter at 0; ties go oldest first. Never ages.
    * ``ours``: key (ln k + ln dhits(now), last_used_ts), i.e. k × decayed uses with the put counted as a use
      (LRFU weighted by k: LRU-like for short half-lives, LFU-like for long ones). It also keeps a floor of
      ``min_states_per_prompt`` states per prompt — the ones with most decayed uses, ties to the smaller k
      (usable by more neighbours) or the larger (more steps per hit) as ``floor_keeps`` says — while any
      unprotected state is left; past that whole prompts go, lowest best-state key first. Admission: an
      approximate hit at similarity ≥ ``dedup_similarity`` adds no new entry (its source already serves that
      neighbourhood; the hit refreshes it). Exact-tier images are capped at ``image_budget_fraction`` of the
      byte budget (see below).
    * ``lru``: (last_used_ts); ``lfu``: (hits, last_used_ts); ``fifo``: (created_ts).
All keys end with the state id, so orders are total and deterministic.

Exact-tier images (``ours`` only): a final PNG is ~13× an fp16-zstd state at 512² yet serves only exact repeats
(~0.6 % of the trace's requests against ~37 % approximate hits), and without a cap it left only with its
prompt's last state, which the floor protects. So when eviction runs (stored bytes over the budget), ``ours``
first drops images, least recently used first (``ImageMeta.used_ts``: stored or last exact hit), until the
images hold at most ``image_budget_fraction`` × the budget (``evict_images``; phase 0 of the SQL twin). The
prompt and its states stay; its exact lookups become misses (or approximate hits). The other policies keep
images with their prompts (``image_budget_fraction`` is None): the benchmark's ``exact`` configuration (FIFO,
images only) must be able to fill the budget with images.

Per-tenant budgets (``tenant_budget_bytes`` > 0): before the global budget, every tenant (the namespace's tenant,
``__shared__`` included) storing more than ``tenant_budget_bytes`` is brought back under it by evicting only its own
entries, in the policy's order restricted to that tenant (images beyond the cap of the tenant budget first, as
above). ``tenant_overflows`` says which tenants and how much; ``evict_tenants`` is the in-memory twin of that stage.
A tenant's burst then evicts its own entries, not everyone's; the global budget still bounds the sum.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

LN2 = math.log(2.0)
_TINY = 1e-300
# Share of the byte budget the exact tier's images may keep under ``ours`` (NIRVANA_CACHE_IMAGE_BUDGET_FRACTION).
DEFAULT_IMAGE_BUDGET_FRACTION = 0.1
FLOOR_KEEPS = ("low_k", "high_k")
# States per prompt ``ours`` protects (NIRVANA_CACHE_MIN_STATES_PER_PROMPT). 0 since session 5: on the dreambot
# trace (1,800 requests) a floor of 2 saved 0.063 of steps at a 100-prompt budget, none 0.084 (LRU 0.093), and
# never less at larger budgets (docs/BENCHMARKS.md): kept lowest-k states serve many hits at few steps each.
DEFAULT_MIN_STATES_PER_PROMPT = 0
# Half-life of ``ours``'s decayed use counts (NIRVANA_CACHE_HALF_LIFE_S). 1 h since session 8: on the dreambot
# trace (20,004 requests, 1,000-prompt budget) 6 h saved 0.127 of steps, 1 h 0.140 (10 min 0.140; LRU 0.136), and
# at the default budget 1 h was level with 6 h (0.1863 vs 0.1862 after 60k requests; docs/BENCHMARKS.md). With a
# long half-life a state's put counts as a use for hours, so stale k = 25 states outlive fresh prompts.
DEFAULT_HALF_LIFE_S = 3600.0


@dataclass
class StateMeta:
    """Bookkeeping of one cached state (no tensor). ``bytes`` is what evicting it frees (0 when borrowed)."""

    id: int
    prompt_id: int
    k: int
    bytes: int = 0
    hits: int = 0
    dhits: float = 0.0
    dhits_ts: float = 0.0
    created_ts: float = 0.0
    last_used_ts: float = 0.0
    tenant: str = ""  # the namespace's tenant (per-tenant budgets); one tenant when left ""


@dataclass
class ImageMeta:
    """An exact-tier image: its prompt, the bytes dropping it frees, and when it was stored or last served."""

    prompt_id: int
    bytes: int = 0
    used_ts: float = 0.0
    tenant: str = ""


def tenant_overflows(bytes_by_tenant: Mapping[str, int], tenant_budget_bytes: int) -> dict[str, int]:
    """Bytes each tenant stores beyond ``tenant_budget_bytes``, for the tenants over it only.

    Ordered by overflow, largest first (ties by tenant name), which is the order the per-tenant stage visits
    them (the order does not change the outcome: each tenant evicts only its own entries). A tenant at exactly
    its budget is not over it; ``tenant_budget_bytes`` 0 means no per-tenant budget (always ``{}``).

    Raises:
        ValueError: ``tenant_budget_bytes`` < 0.
    """
    if tenant_budget_bytes < 0:
        raise ValueError(f"tenant_budget_bytes must be >= 0, got {tenant_budget_bytes}")
    if tenant_budget_bytes == 0:
        return {}
    over = [(t, int(b) - tenant_budget_bytes) for t, b in bytes_by_tenant.items() if b > tenant_budget_bytes]
    return dict(sorted(over, key=lambda x: (-x[1], x[0])))


class EvictionPolicy:
    """Base: shared counter updates; subclasses define the key (and optionally admission and a floor).

    Args:
        half_life_s: half-life of the decayed use count (seconds of the cache's clock).
        insert_credit: uses credited to a new state (``ours`` needs > 0 so new states can outrank stale ones).
        min_states_per_prompt: per-prompt floor honoured while unprotected states remain (``ours`` only).
        image_budget_fraction: share of the budget exact-tier images may keep when eviction runs, in [0, 1]
            (``ours`` only; None: no cap, an image goes with its prompt).
        floor_keeps: which states the floor keeps when decayed uses tie (as they do for a prompt's states until
            one is hit): ``low_k`` (usable by more neighbours: any hit at K >= k) or ``high_k`` (more steps
            saved per hit: on the dreambot trace hits at K = 25 carry 55 % of the saved steps).
    """

    name: ClassVar[str] = "base"
    uses_floor: ClassVar[bool] = False
    uses_image_cap: ClassVar[bool] = False

    def __init__(
        self,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
        insert_credit: float = 1.0,
        min_states_per_prompt: int = 0,
        image_budget_fraction: float | None = None,
        floor_keeps: str = "low_k",
    ) -> None:
        if floor_keeps not in FLOOR_KEEPS:
            raise ValueError(f"floor_keeps must be one of {FLOOR_KEEPS}, got {floor_keeps!r}")
        self.floor_keeps = floor_keeps
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        if insert_credit < 0:
            raise ValueError(f"insert_credit must be >= 0, got {insert_credit}")
        if not 0 <= min_states_per_prompt <= 100:
            raise ValueError(f"min_states_per_prompt must be in 0..100, got {min_states_per_prompt}")
        self.half_life_s = float(half_life_s)
        self.insert_credit = float(insert_credit)
        self.min_states_per_prompt = min_states_per_prompt if self.uses_floor else 0
        if image_budget_fraction is not None and not 0.0 <= image_budget_fraction <= 1.0:
            raise ValueError(f"image_budget_fraction must be in [0, 1], got {image_budget_fraction}")
        self.image_budget_fraction = image_budget_fraction if self.uses_image_cap else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(half_life_s={self.half_life_s}, insert_credit={self.insert_credit}, "
            f"min_states_per_prompt={self.min_states_per_prompt}, floor_keeps={self.floor_keeps!r}, "
            f"image_budget_fraction={self.image_budget_fraction})"
        )

    # ------------------------------------------------------------------ counters
    def decayed(self, meta: StateMeta, now: float) -> float:
        """``dhits`` decayed to ``now`` (never grows for now < dhits_ts)."""
        dt = max(0.0, now - meta.dhits_ts)
        return meta.dhits * math.pow(2.0, -dt / self.half_life_s)

    def on_put(self, meta: StateMeta, now: float) -> None:
        """A new state: counters at zero, the put credited as ``insert_credit`` uses."""
        meta.hits = 0
        meta.dhits = self.insert_credit
        meta.dhits_ts = now
        meta.created_ts = now
        meta.last_used_ts = now

    def on_hit(self, meta: StateMeta, now: float) -> None:
        """One hit served from this state (the SQL twin is ``CacheIndex.count_hit``)."""
        meta.dhits = self.decayed(meta, now) + 1.0
        meta.dhits_ts = max(meta.dhits_ts, now)
        meta.hits += 1
        meta.last_used_ts = max(meta.last_used_ts, now)

    # ------------------------------------------------------------------ order
    def key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        """Sort key; ascending order is eviction order."""
        raise NotImplementedError

    def sql_key_terms(self) -> list[str]:
        """SQL expressions over ``cache_states s`` (ascending) matching :meth:`key` term by term; they may use
        ``%(now)s`` and ``%(half_life)s``. At least two terms; the last is ``s.id``."""
        raise NotImplementedError

    def protect_key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        """Rank within a prompt for the floor: higher is kept first (most decayed uses, then k as
        ``floor_keeps`` says)."""
        k = -meta.k if self.floor_keeps == "low_k" else meta.k
        return (math.log(max(self.decayed(meta, now), _TINY)), k, -meta.id)

    def sql_protect_order(self) -> list[str]:
        """:meth:`protect_key` as SQL ``ORDER BY`` terms over ``cache_states s`` (first = kept first)."""
        return [
            "(ln(greatest(s.dhits, 1e-300)) - greatest(0, %(now)s - s.dhits_ts) * 0.6931471805599453 "
            "/ %(half_life)s) DESC",
            "s.k ASC" if self.floor_keeps == "low_k" else "s.k DESC",
            "s.id ASC",
        ]

    def admit(self, similarity: float | None, hit_tier: str | None) -> bool:
        """Whether a served generation becomes a new cache entry (exact hits never do)."""
        return hit_tier != "exact"

    # ------------------------------------------------------------------ images (phase 0)
    def image_cap(self, budget_bytes: int) -> int | None:
        """Bytes the exact tier's images may keep when eviction runs (None: no cap)."""
        if self.image_budget_fraction is None:
            return None
        return int(self.image_budget_fraction * budget_bytes)

    @staticmethod
    def image_key(img: ImageMeta) -> tuple[float, int]:
        """Ascending order in which images are dropped: least recently stored or served first."""
        return (img.used_ts, img.prompt_id)

    @staticmethod
    def sql_image_key_terms() -> list[str]:
        """SQL over ``cache_prompts p`` matching :meth:`image_key` (rows written before migration 0002 have no
        ``image_used_ts``: their creation time stands in)."""
        return ["coalesce(p.image_used_ts, p.created_ts)", "p.id"]

    def evict_images(self, images: Iterable[ImageMeta], budget_bytes: int) -> list[int]:
        """Prompt ids whose images go (in order) so that the rest fit the cap; [] without a cap.

        The caller runs this only when stored bytes exceed ``budget_bytes`` (as ``CacheIndex.evict_to_budget``
        does); states are then evicted by :meth:`evict_candidates` as usual.
        """
        cap = self.image_cap(budget_bytes)
        if cap is None:
            return []
        items = sorted(images, key=self.image_key)
        excess = sum(i.bytes for i in items) - cap
        out: list[int] = []
        freed = 0
        for img in items:
            if freed >= excess:
                break
            out.append(img.prompt_id)
            freed += img.bytes
        return out

    # ------------------------------------------------------------------ in-memory eviction
    def evict_candidates(self, metas: Iterable[StateMeta], bytes_to_free: int, now: float) -> list[int]:
        """Ids of the states to evict, in order, until their ``bytes`` sum to ``bytes_to_free``.

        Phase 1 takes states in key order, skipping each prompt's floor; phase 2 (only if still short) takes
        whole prompts ordered by (max first key term, max second key term, prompt id) — the SQL twin's order.
        """
        if bytes_to_free <= 0:
            return []
        items = list(metas)
        protected: set[int] = set()
        floor = self.min_states_per_prompt
        if floor > 0:
            by_prompt: dict[int, list[StateMeta]] = defaultdict(list)
            for m in items:
                by_prompt[m.prompt_id].append(m)
            for group in by_prompt.values():
                group.sort(key=lambda m: self.protect_key(m, now), reverse=True)
                protected.update(m.id for m in group[:floor])
        out: list[int] = []
        freed = 0
        for m in sorted((m for m in items if m.id not in protected), key=lambda m: self.key(m, now)):
            out.append(m.id)
            freed += m.bytes
            if freed >= bytes_to_free:
                return out
        rest: dict[int, list[StateMeta]] = defaultdict(list)
        for m in items:
            if m.id in protected:
                rest[m.prompt_id].append(m)

        def group_key(g: list[StateMeta]) -> tuple[float, float, int]:
            keys = [self.key(m, now) for m in g]
            return (max(k[0] for k in keys), max(k[1] for k in keys), g[0].prompt_id)

        groups = sorted(rest.values(), key=group_key)
        for g in groups:
            out.extend(m.id for m in sorted(g, key=lambda m: self.key(m, now)))
            freed += sum(m.bytes for m in g)
            if freed >= bytes_to_free:
                break
        return out

    def evict_tenants(
        self,
        metas: Iterable[StateMeta],
        images: Iterable[ImageMeta],
        tenant_budget_bytes: int,
        now: float,
    ) -> tuple[list[int], list[int]]:
        """The per-tenant stage of eviction, in memory: (prompt ids whose images go, state ids that go).

        For every tenant whose states and images hold more than ``tenant_budget_bytes`` (``tenant_overflows``),
        its images beyond ``image_cap(tenant_budget_bytes)`` go first (:meth:`evict_images` over that tenant's
        images), then, if it is still over, its states in policy order (:meth:`evict_candidates` over that
        tenant's states). Invariants: only tenants over their budget lose anything, and each only its own
        entries; ``tenant_budget_bytes`` 0 evicts nothing. The global budget is a separate, later stage.
        """
        by_tenant: dict[str, list[StateMeta]] = defaultdict(list)
        imgs_by_tenant: dict[str, list[ImageMeta]] = defaultdict(list)
        for m in metas:
            by_tenant[m.tenant].append(m)
        for i in images:
            imgs_by_tenant[i.tenant].append(i)
        stored = {t: sum(m.bytes for m in by_tenant[t]) + sum(i.bytes for i in imgs_by_tenant[t])
                  for t in set(by_tenant) | set(imgs_by_tenant)}  # fmt: skip
        out_images: list[int] = []
        out_states: list[int] = []
        for tenant, overflow in tenant_overflows(stored, tenant_budget_bytes).items():
            dropped = self.evict_images(imgs_by_tenant[tenant], tenant_budget_bytes)
            gone = set(dropped)
            overflow -= sum(i.bytes for i in imgs_by_tenant[tenant] if i.prompt_id in gone)
            out_images += dropped
            out_states += self.evict_candidates(by_tenant[tenant], overflow, now)
        return out_images, out_states


class PaperLCBFU(EvictionPolicy):
    """The paper's LCBFU: score = k × hits, new states at 0, ties oldest first, no ageing, no floor.

    Args:
        admit_hits: record generations served from a hit as new entries too (True: "record everything");
            False reproduces the public re-implementation, which adds entries only after a miss.
    """

    name = "paper"

    def __init__(self, admit_hits: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.admit_hits = admit_hits

    def key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        return (float(meta.k * meta.hits), meta.created_ts, meta.id)

    def sql_key_terms(self) -> list[str]:
        return ["s.score", "s.created_ts", "s.id"]

    def admit(self, similarity: float | None, hit_tier: str | None) -> bool:
        if hit_tier == "exact":
            return False
        return self.admit_hits or hit_tier in (None, "miss")


class OursPolicy(EvictionPolicy):
    """k × exponentially decayed uses (put counts as a use), per-prompt floor, near-duplicate admission rule,
    exact-tier images capped at a share of the budget.

    Args:
        dedup_similarity: an approximate hit at or above this similarity is not admitted as a new entry.
        image_budget_fraction: images keep at most this share of the budget when eviction runs (None: no cap).
    """

    name = "ours"
    uses_floor = True
    uses_image_cap = True

    def __init__(
        self,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
        insert_credit: float = 1.0,
        min_states_per_prompt: int = DEFAULT_MIN_STATES_PER_PROMPT,
        dedup_similarity: float = 0.99,
        image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION,
        floor_keeps: str = "low_k",
    ) -> None:
        super().__init__(half_life_s, insert_credit, min_states_per_prompt, image_budget_fraction, floor_keeps)
        if not 0.0 < dedup_similarity <= 1.0001:
            raise ValueError(f"dedup_similarity must be in (0, 1], got {dedup_similarity}")
        self.dedup_similarity = dedup_similarity

    def key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        return (
            math.log(meta.k) + math.log(max(self.decayed(meta, now), _TINY)),
            meta.last_used_ts,
            meta.id,
        )

    def sql_key_terms(self) -> list[str]:
        return [
            "(ln(s.k) + ln(greatest(s.dhits, 1e-300)) - greatest(0, %(now)s - s.dhits_ts) * "
            "0.6931471805599453 "
            "/ %(half_life)s)",
            "s.last_used_ts",
            "s.id",
        ]

    def admit(self, similarity: float | None, hit_tier: str | None) -> bool:
        if hit_tier == "exact":
            return False
        return not (hit_tier == "approximate" and similarity is not None and similarity >= self.dedup_similarity)


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        return (meta.last_used_ts, meta.id)

    def sql_key_terms(self) -> list[str]:
        return ["s.last_used_ts", "s.id"]


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        return (float(meta.hits), meta.last_used_ts, meta.id)

    def sql_key_terms(self) -> list[str]:
        return ["s.hits", "s.last_used_ts", "s.id"]


class FIFOPolicy(EvictionPolicy):
    name = "fifo"

    def key(self, meta: StateMeta, now: float) -> tuple[float, ...]:
        return (meta.created_ts, meta.id)

    def sql_key_terms(self) -> list[str]:
        return ["s.created_ts", "s.id"]


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (PaperLCBFU, OursPolicy, LRUPolicy, LFUPolicy, FIFOPolicy)
}


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """Policy by name (``ours``, ``paper``, ``lru``, ``lfu``, ``fifo``); ``kwargs`` go to its constructor.

    ``min_states_per_prompt`` and ``image_budget_fraction`` are accepted by all and ignored except by ``ours``
    (an out-of-range fraction is an error for all).
    """
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"eviction policy must be one of {sorted(POLICIES)}, got {name!r}") from None
    if cls is OursPolicy:
        return cls(**kwargs)
    kwargs_base = dict(kwargs)
    kwargs_base.pop("dedup_similarity", None)
    return cls(**kwargs_base)
