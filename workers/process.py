"""What every worker entry point does: build its Celery app and :class:`~workers.context.WorkerContext`, register
the tasks on the one with the other, and consume a queue.

Imports only downwards (``workers.tasks``, ``workers.context``, ``workers.celery_app``, ``nirvana``); the entry
points (``workers.router``, ``render``, ``maintenance``, ``beat``, ``app``) import it and nothing imports them.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready

from nirvana.config import Settings
from nirvana.service.liveness import start_heartbeat, worker_name
from workers import tasks
from workers.celery_app import CelerySender, make_celery
from workers.context import FaultHooks, RenderEngine, WorkerContext


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build(
    settings: Settings,
    render_engine: RenderEngine | None = None,
    fault_hooks: FaultHooks | None = None,
) -> tuple[Celery, WorkerContext]:
    """The process's Celery app (declaring the render queue of ``render_engine``'s model, if any) and its context,
    nirvana's tasks registered on the app to run against the context."""
    queues = None if render_engine is None else [render_engine.model.queue]
    app = make_celery(settings, render_queues=queues)
    ctx = WorkerContext(settings, CelerySender(app), render_engine=render_engine, fault_hooks=fault_hooks)
    tasks.register(app, ctx)
    return app, ctx


def serve(app: Celery, ctx: WorkerContext, queue: str, role: str, pool: list[str], args: list[str]) -> None:
    """Consume ``queue`` with Celery ``pool`` options (e.g. ``["--pool=solo"]``) until stopped; the worker's
    heartbeat (role ``role``) starts once its consumer is up. ``--beat`` in ``args`` also runs the beat scheduler
    in this process (exactly one per deployment)."""
    s = ctx.settings
    pool_ = ctx.store().pool

    @worker_ready.connect(weak=False)
    def _alive(**_: object) -> None:
        start_heartbeat(pool_, worker_name(role), role, queue)

    argv = ["worker", "-Q", queue, *pool, "--prefetch-multiplier=1", "-n", f"{role}@%h", "-l", "INFO"]
    if "--beat" in args:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(s.data_dir / "celerybeat-schedule")]
    app.worker_main([*argv, *(a for a in args if a != "--beat")])
