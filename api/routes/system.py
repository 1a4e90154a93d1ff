"""Health (no key), readiness (database, broker, storage), Prometheus metrics and cache statistics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import Admin, Caller, Service, authenticate, key_from_headers
from nirvana.service.errors import Forbidden
from nirvana.service.liveness import live_workers

log = logging.getLogger(__name__)
router = APIRouter(tags=["system"])

# /readyz is public: its checks (a query, a broker ping, a storage write/read/delete) run at most once per this
# many seconds per process, and never two rounds at once, so a flood of probes cannot load the dependencies.
READY_CACHE_S = 1.0
ROLE = "api"  # which process answered (workers have no HTTP endpoint)


class ReadinessChecks:
    """The dependency checks of one API process, reused for ``READY_CACHE_S``.

    Invariant: at most one round of checks runs at a time; a request arriving meanwhile gets the previous
    round's result (or "pending", i.e. not ready, before the first round finished) instead of waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._checks: dict[str, str] = {"readiness": "pending"}

    def get(self, checks: dict[str, Callable[[], None]]) -> dict[str, str]:
        """Per component ``"ok"`` or ``"error: <type>: <message>"`` (the message is for admins only)."""
        if time.monotonic() - self._at > READY_CACHE_S and self._lock.acquire(blocking=False):
            try:
                out: dict[str, str] = {}
                for name, fn in checks.items():
                    try:
                        fn()
                        out[name] = "ok"
                    except Exception as e:
                        log.warning("readiness: %s failed (%s: %s)", name, type(e).__name__, e)
                        out[name] = f"error: {type(e).__name__}: {e}"[:300]
                self._checks, self._at = out, time.monotonic()
            finally:
                self._lock.release()
        return dict(self._checks)


_readiness_lock = threading.Lock()


def _readiness(request: Request) -> ReadinessChecks:
    with _readiness_lock:
        rc: ReadinessChecks | None = getattr(request.app.state, "readiness", None)
        if rc is None:
            rc = request.app.state.readiness = ReadinessChecks()
        return rc


def _is_admin(request: Request) -> bool:
    """Whether the request carries a valid admin key. Any failure to tell (no key, a bad or revoked one, the
    address throttled, the database down) is simply "no": readiness must answer whatever happens to auth."""
    key = key_from_headers(request)
    if key is None:
        return False
    try:
        return authenticate(request, key).is_admin
    except Exception as e:
        log.debug("readyz: key not accepted (%s)", type(e).__name__)
        return False


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, svc: Service) -> JSONResponse:
    """Readiness of this API process: database (migrated), broker and storage answer → 200
    ``{"status": "ready", "role": "api"}``, else 503 ``{"status": "not_ready", "role": "api"}``.

    No key is needed and, without one, nothing else is said (no error text, models or workers). With an admin
    key (``Authorization: Bearer`` or ``X-API-Key``) the body adds ``checks``: per component ``"ok"`` or the
    error, the served models and the live workers per role (informational: the API accepts jobs before workers
    are up; they queue). Any other key is answered as no key.
    """
    checks = _readiness(request).get(
        {"database": svc.check_database, "broker": request.app.state.check_broker, "storage": svc.check_storage}
    )
    ok = all(v == "ok" for v in checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "role": ROLE}
    if _is_admin(request):
        details: dict[str, Any] = dict(checks)
        try:
            details["models"] = svc.served_models()
            details["workers"] = live_workers(svc.store.pool)
        except Exception as e:
            details["models"], details["workers"] = [], {}
            details["registry"] = f"error: {type(e).__name__}: {e}"[:300]
        body["checks"] = details
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(request: Request, svc: Service, caller: Caller) -> Response:
    """Prometheus metrics of the whole deployment (any key; admin keys only with NIRVANA_METRICS_ADMIN_ONLY)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if svc.settings.metrics_admin_only and not caller.is_admin:
        raise Forbidden("/metrics needs an admin key here (NIRVANA_METRICS_ADMIN_ONLY)")

    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/cache/stats")
async def cache_stats(request: Request, svc: Service, caller: Caller, all: bool = False) -> dict[str, Any]:
    """The caller's cache (entries, bytes, hits) and job outcomes; ``?all=true`` (admin) for every tenant."""
    if all and not caller.is_admin:
        raise Forbidden("?all=true needs an admin key")
    cache = request.app.state.cache
    tenant = None if all else await run_in_threadpool(svc.pools.cache_tenant, caller.tenant)
    stats = await run_in_threadpool(cache.stats, tenant)
    jobs = await run_in_threadpool(svc.store.tenant_summary, caller.tenant)
    done = max(jobs["done"], 1)
    jobs["hit_rate"] = round((jobs["exact"] + jobs["approximate"]) / done, 4)
    jobs["steps_saved_fraction"] = round(jobs["steps_saved"] / max(jobs["steps"], 1), 4)
    return {"cache": stats, "jobs": jobs}


@router.post("/v1/cache/evict")
async def cache_evict(request: Request, caller: Admin) -> dict[str, Any]:
    """Run eviction to budget now (admin)."""
    result: dict[str, Any] = await run_in_threadpool(request.app.state.cache.evict_to_budget)
    return result
