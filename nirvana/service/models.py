"""The registry of served models: each render worker registers the model it loaded (at start, then as a
heartbeat), and the API and router read it.

A served model's render queue is ``render.<model_key at its native size>``; jobs of other sizes go to the same
queue (the worker serves every size of its checkpoint), but their cache namespace is their own model_key.

Invariants:
    * The router publishes only to queues registered here, so a misspelt queue never swallows jobs (Celery's
      ``task_create_missing_queues`` is off as well).
    * Registration is an upsert keyed by (name, checkpoint): during a rolling deploy the old and the new
      checkpoint of a name are two rows (two queues); new jobs go to the most recently registered one whose
      workers are alive (``ModelRegistry``), so the two sets of workers never overwrite one row in turn.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.rows import tuple_row

from nirvana.config import BUNDLED_MODEL, Settings
from nirvana.engine.state import make_model_key, scheduler_signature
from nirvana.service.errors import FieldError

QUEUE_PREFIX = "render."
ROUTE_QUEUE = "route"
MAINTENANCE_QUEUE = "maintenance"  # eviction, gate refit, reaper, orphan sweep, retention: never on `route`


def served_name(settings: Settings) -> str:
    """The name clients use for the configured model: ``served_model_name`` or one derived from ``model``."""
    if settings.served_model_name:
        return settings.served_model_name
    ref = settings.model
    if ref == BUNDLED_MODEL:
        return BUNDLED_MODEL
    p = Path(ref)
    return p.name if p.is_dir() else ref


@dataclass(frozen=True)
class ServedModel:
    name: str
    ref: str
    checkpoint_id: str
    scheduler_family: str
    height: int
    width: int
    size_multiple: int
    default_guidance: float
    queue: str
    scheduler_config: str = ""

    def model_key(self, height: int, width: int) -> str:
        """The cache namespace key of a job of this size (equal to the engine's ``model_key(h, w)``)."""
        return make_model_key(self.checkpoint_id, height, width, self.scheduler_family, self.scheduler_config)

    @classmethod
    def from_components(cls, name: str, ref: str, comps: Any) -> ServedModel:
        """Describe a loaded ``ModelComponents``."""
        h, w = comps.sample_size
        key = comps.model_key(h, w)
        return cls(
            name=name,
            ref=ref,
            checkpoint_id=comps.checkpoint_id,
            scheduler_family=comps.scheduler_family,
            height=int(h),
            width=int(w),
            size_multiple=int(comps.size_multiple),
            default_guidance=float(comps.default_guidance),
            queue=QUEUE_PREFIX + key,
            scheduler_config=scheduler_signature(comps.scheduler),
        )


_COLS = (
    "name, ref, checkpoint_id, scheduler_family, height, width, size_multiple, default_guidance, queue, "
    "scheduler_config"
)


def register(pool: Any, model: ServedModel) -> None:
    """Upsert ``model`` and refresh its heartbeat."""
    with pool.connection() as conn:
        conn.execute(
            f"INSERT INTO served_models ({_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (name, checkpoint_id) DO UPDATE SET ref = EXCLUDED.ref, "
            "scheduler_family = EXCLUDED.scheduler_family, height = EXCLUDED.height, width = EXCLUDED.width, "
            "size_multiple = EXCLUDED.size_multiple, default_guidance = EXCLUDED.default_guidance, "
            "queue = EXCLUDED.queue, scheduler_config = EXCLUDED.scheduler_config, heartbeat_at = now()",
            (
                model.name,
                model.ref,
                model.checkpoint_id,
                model.scheduler_family,
                model.height,
                model.width,
                model.size_multiple,
                model.default_guidance,
                model.queue,
                model.scheduler_config,
            ),
        )


LIVE_S = 60.0  # a served model whose heartbeat (every 15 s) is older than this has no live worker


def heartbeat(pool: Any, model: ServedModel) -> None:
    with pool.connection() as conn:
        conn.execute(
            "UPDATE served_models SET heartbeat_at = now() WHERE name = %s AND checkpoint_id = %s",
            (model.name, model.checkpoint_id),
        )


def list_models(pool: Any) -> list[tuple[ServedModel, float]]:
    """Every registered (name, checkpoint) with the age of its heartbeat in seconds; per name, the most
    recently registered first."""
    with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            f"SELECT {_COLS}, extract(epoch FROM now() - heartbeat_at) FROM served_models "
            "ORDER BY name, registered_at DESC, checkpoint_id"
        ).fetchall()
    return [(ServedModel(*r[:10]), float(r[10])) for r in rows]


def current(rows: list[tuple[ServedModel, float]]) -> dict[str, ServedModel]:
    """Per name, the checkpoint new jobs go to: the most recently registered one with a live heartbeat, or
    the most recently registered one when none is live (jobs then wait in its queue). ``rows`` as
    :func:`list_models` returns them (newest registration first within a name)."""
    out: dict[str, ServedModel] = {}
    live: set[str] = set()
    for m, age in rows:
        if m.name not in out or (m.name not in live and age <= LIVE_S):
            out[m.name] = m
            if age <= LIVE_S:
                live.add(m.name)
    return out


class ModelRegistry:
    """Cached view of ``served_models`` for request validation (refreshed every ``ttl_s``)."""

    def __init__(self, pool: Any, default_name: str, ttl_s: float = 5.0) -> None:
        self.pool = pool
        self.default_name = default_name
        self.ttl_s = ttl_s
        self._models: dict[str, ServedModel] = {}
        self._at = -1e9
        self._lock = threading.Lock()

    def models(self, refresh: bool = False) -> dict[str, ServedModel]:
        with self._lock:
            if refresh or time.monotonic() - self._at > self.ttl_s:
                self._models = current(list_models(self.pool))
                self._at = time.monotonic()
            return dict(self._models)

    def resolve(self, name: str | None) -> ServedModel:
        """The served model called ``name`` (None: the default one).

        Raises:
            FieldError("model"): no such model is served (yet).
        """
        models = self.models()
        want = name or self.default_name
        if want not in models:
            models = self.models(refresh=True)
        if want in models:
            return models[want]
        if name is None and len(models) == 1:
            return next(iter(models.values()))
        served = sorted(models) or "none yet: start a render worker"
        raise FieldError("model", f"{want!r} is not served here; served: {served}")
