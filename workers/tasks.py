"""Task definitions: each is one call into ``nirvana.pipeline`` through the process's
:class:`~workers.context.WorkerContext`; the job id is the task id."""

from __future__ import annotations

from typing import Any

import psycopg
from celery import Celery

from workers.celery_app import (
    EVICT_TASK,
    GATE_TASK,
    REAP_TASK,
    RENDER_TASK,
    RETENTION_TASK,
    ROUTE_TASK,
    SWEEP_TASK,
)
from workers.context import WorkerContext

_TRANSIENT = (psycopg.OperationalError, ConnectionError, TimeoutError)


def register(app: Celery, ctx: WorkerContext) -> None:
    """Register nirvana's tasks on ``app``; they run against ``ctx`` (built by the process's entry point)."""

    @app.task(
        name=ROUTE_TASK,
        acks_late=True,
        autoretry_for=_TRANSIENT,
        retry_backoff=True,
        retry_backoff_max=30,
        max_retries=10,
    )
    def route(job_id: str) -> str:
        return str(ctx.router().route(job_id))

    @app.task(name=RENDER_TASK, acks_late=True)
    def render(job_id: str, attempt: int) -> str:
        # No autoretry: a failure before the claim leaves the job routed (the reaper re-sends it), one after
        # the claim is retried by the renderer itself or, if the process died, by the reaper.
        return str(ctx.renderer().render(job_id, int(attempt)))

    @app.task(name=EVICT_TASK, acks_late=True)
    def evict() -> dict[str, Any]:
        return dict(ctx.maintenance().evict())

    @app.task(name=GATE_TASK, acks_late=True)
    def refit_gate() -> dict[str, Any]:
        return dict(ctx.maintenance().refit_gate())

    @app.task(name=REAP_TASK, acks_late=True)
    def reap() -> dict[str, int]:
        return dict(ctx.maintenance().reap())

    @app.task(name=SWEEP_TASK, acks_late=True)
    def sweep() -> dict[str, Any]:
        return dict(ctx.maintenance().sweep())

    @app.task(name=RETENTION_TASK, acks_late=True)
    def retention() -> dict[str, int]:
        return dict(ctx.maintenance().retention())
