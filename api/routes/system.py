"""Health (no key), readiness (database, broker, storage), Prometheus metrics and cache statistics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import Admin, Caller, Service
from nirvana.service.errors import Forbidden
from nirvana.service.liveness import live_workers

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, svc: Service) -> JSONResponse:
    """Readiness: database (migrated), broker and storage answer. Also lists served models and live workers
    per role (informational: the API can accept jobs before workers are up; they queue)."""
    checks: dict[str, Any] = {}
    ok = True
    for name, fn in (
        ("database", svc.check_database),
        ("broker", request.app.state.check_broker),
        ("storage", svc.check_storage),
    ):
        try:
            fn()
            checks[name] = "ok"
        except Exception as e:
            ok = False
            checks[name] = f"error: {type(e).__name__}: {e}"[:300]
    try:
        checks["models"] = svc.served_models()
        checks["workers"] = live_workers(svc.store.pool)
    except Exception:
        checks["models"], checks["workers"] = [], {}
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


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
