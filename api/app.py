"""The FastAPI application: ``uvicorn api.app:create_app --factory``.

Settings come from ``NIRVANA_*`` (``database_url``, ``broker_url`` must be set; ``nirvana up`` sets them). Error
bodies are ``{"error": {"type", "message", "field"?}}``; validation errors are 422 and name the field.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from nirvana.config import Settings, get_settings
from nirvana.service.errors import ServiceError

log = logging.getLogger(__name__)

# Longest a request waits for a database connection before answering 503 (e.g. while Postgres restarts).
DB_WAIT_S = 5.0


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        src = parts.pop(0)
        if src == "header" and parts:
            return str(parts[0])
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; connections open in the lifespan (one pool, one Celery producer per process)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from prometheus_client import CollectorRegistry

        from nirvana.cache.core import ApproximateCache
        from nirvana.cache.store import LatentStore
        from nirvana.service.jobs import JobStore
        from nirvana.service.keys import KeyMetrics, KeyVerifier
        from nirvana.service.metrics import JobsCollector
        from nirvana.service.service import JobService
        from workers.celery_app import CelerySender, make_celery

        if not settings.database_url:
            raise RuntimeError("NIRVANA_DATABASE_URL must be set (or run `nirvana up`)")
        celery = make_celery(settings)
        store = JobStore.connect(settings.database_url, max_size=16, timeout=DB_WAIT_S)
        storage = LatentStore.from_settings(settings)
        app.state.service = JobService(settings, store, CelerySender(celery), storage)
        # The API process verifies keys with the abuse settings (the service's default verifier has the defaults).
        app.state.service.keys = KeyVerifier(
            store.pool, ttl_s=settings.api_key_cache_s, negative_ttl_s=settings.api_key_negative_cache_s
        )
        app.state.cache = ApproximateCache.from_settings(settings)
        registry = CollectorRegistry()
        registry.register(JobsCollector(store.pool, jobs_per_render_worker=settings.render_max_batch))
        registry.register(KeyMetrics(app.state.service.keys))
        app.state.registry = registry

        def check_broker() -> None:
            with celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                conn.default_channel.client.ping()

        app.state.check_broker = check_broker
        try:
            yield
        finally:
            app.state.cache.close()
            store.close()

    app = FastAPI(
        title="nirvana",
        version="0.1.0",
        description="Text-to-image diffusion with approximate caching (NIRVANA, NSDI'24).",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        err: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message}
        field = getattr(exc, "field", None)
        if field:
            err["field"] = field
        headers = {"Retry-After": "1"} if exc.status in (409, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse({"error": err}, status_code=exc.status, headers=headers)

    @app.exception_handler(psycopg.OperationalError)
    async def _database_down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        # Postgres down or restarting (psycopg_pool.PoolTimeout is an OperationalError too): a 503 with the reason
        # and Retry-After, never a 500; the pool reconnects by itself once the server is back.
        msg = f"database unavailable ({type(exc).__name__}); retry later"
        return JSONResponse(
            {"error": {"type": "Unavailable", "message": msg}}, status_code=503, headers={"Retry-After": "1"}
        )

    from nirvana.cache.store import BlobError, BlobUnavailable

    @app.exception_handler(BlobError)
    async def _blob_error(request: Request, exc: BlobError) -> JSONResponse:
        # A stored object (a job's image) that is gone, corrupt or outside the store's root is 404; storage
        # unreachable is 503. The URI and the cause are logged, never returned (they are internal).
        log.warning("%s %s: blob unusable (%s: %s)", request.method, request.url.path, type(exc).__name__, exc)
        if isinstance(exc, BlobUnavailable):
            msg = "storage unavailable; retry later"
            return JSONResponse(
                {"error": {"type": "Unavailable", "message": msg}}, status_code=503, headers={"Retry-After": "1"}
            )
        msg = "image: the stored object is missing or unreadable"
        return JSONResponse({"error": {"type": "NotFound", "message": msg, "field": "image"}}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first: dict[str, Any] = dict(errors[0]) if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _field(first["loc"])
        msg = first["msg"]
        if first.get("type") == "json_invalid":  # loc is ("body", <position>)
            field = "body"
            msg = f"invalid JSON at position {first['loc'][-1]}: {(first.get('ctx') or {}).get('error', '')}"
        detail = [{"field": _field(e["loc"]), "message": e["msg"], "type": e.get("type")} for e in errors]
        return JSONResponse(
            {
                "error": {"type": "validation_error", "field": field, "message": f"{field}: {msg}"},
                "detail": detail,
            },
            status_code=422,
        )

    from api.security import install_security

    install_security(app, settings)

    from api.routes import batches, images, jobs, system

    app.include_router(system.router)
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(images.router)
    return app
