"""The Celery application: queues, delivery guarantees and the beat schedule.

Queues: ``route`` (CPU: embedding + cache lookup), ``maintenance`` (beat's tasks: eviction, gate refit, reaper,
orphan sweep, retention — on their own worker so a long eviction never stalls routing) and ``render.<model_key>``
(one per served model; the model_key at the model's native size). Missing queues are never auto-created
(``task_create_missing_queues = False``): the router sends to a render queue only once a render worker has
registered it in ``served_models``, passing the declared ``kombu.Queue``.

Delivery: render tasks are ``acks_late`` with prefetch 1 on a solo pool (at-least-once; every task is idempotent
because job state moves by guarded UPDATEs in Postgres). The Redis visibility timeout exceeds the longest render
and is set in all three places Celery reads it (broker transport options, result-backend transport options, app
conf). Results are ignored: Postgres is the source of truth for jobs.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from nirvana.config import Settings
from nirvana.service.models import MAINTENANCE_QUEUE, ROUTE_QUEUE

ROUTE_TASK = "nirvana.route"
RENDER_TASK = "nirvana.render"
EVICT_TASK = "nirvana.maintenance.evict"
GATE_TASK = "nirvana.maintenance.refit_gate"
REAP_TASK = "nirvana.maintenance.reap"
SWEEP_TASK = "nirvana.maintenance.sweep"
RETENTION_TASK = "nirvana.maintenance.retention"
MAINTENANCE_TASKS = (EVICT_TASK, GATE_TASK, REAP_TASK, SWEEP_TASK, RETENTION_TASK)


def broker_url(settings: Settings) -> str:
    if not settings.broker_url:
        raise ValueError("broker_url must be set (NIRVANA_BROKER_URL; `nirvana up` starts an embedded Redis)")
    return settings.broker_url


def celery_config(settings: Settings, render_queues: list[str] | None = None) -> dict[str, Any]:
    """Celery settings for every nirvana process (API, router, render workers, beat)."""
    vt = int(settings.visibility_timeout_s)
    transport = {"visibility_timeout": vt}
    queues = [Queue(ROUTE_QUEUE, routing_key=ROUTE_QUEUE), Queue(MAINTENANCE_QUEUE, routing_key=MAINTENANCE_QUEUE)]
    queues += [Queue(q, routing_key=q) for q in render_queues or []]
    return {
        "broker_url": broker_url(settings),
        "result_backend": broker_url(settings),
        "broker_transport_options": dict(transport),
        "result_backend_transport_options": dict(transport),
        "visibility_timeout": vt,
        "broker_connection_retry_on_startup": True,
        "task_queues": queues,
        "task_default_queue": ROUTE_QUEUE,
        "task_create_missing_queues": False,
        "task_routes": {
            ROUTE_TASK: {"queue": ROUTE_QUEUE},
            **{t: {"queue": MAINTENANCE_QUEUE} for t in MAINTENANCE_TASKS},
        },
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # No task events: they cost four Redis publishes per task (sent, received, started, succeeded) — a third
        # of the router's CPU per job at batch 32 — and nothing reads them; the autoscaling signal and job state
        # come from Postgres (/metrics). `celery control enable_events` turns them on for a Flower session.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "beat_schedule": {
            "evict-to-budget": {"task": EVICT_TASK, "schedule": settings.beat_evict_s},
            "refit-novelty-gate": {"task": GATE_TASK, "schedule": settings.beat_gate_s},
            "reap-stuck-jobs": {"task": REAP_TASK, "schedule": settings.beat_reap_s},
            "sweep-orphans": {"task": SWEEP_TASK, "schedule": settings.beat_sweep_s},
            "retention": {"task": RETENTION_TASK, "schedule": settings.beat_retention_s},
        },
    }


def make_celery(settings: Settings, render_queues: list[str] | None = None) -> Celery:
    """A configured Celery app (queues, delivery, beat schedule) without tasks: what sends tasks (the API) needs
    nothing more; worker processes register theirs with ``workers.tasks.register(app, ctx)``."""
    app = Celery("nirvana")
    app.conf.update(celery_config(settings, render_queues))
    return app


class CelerySender:
    """``nirvana.service.service.TaskSender`` over Celery: the task id is the job id."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_route(self, job_id: str) -> None:
        self.app.send_task(ROUTE_TASK, args=[job_id], task_id=job_id, queue=ROUTE_QUEUE)

    def send_render(self, job_id: str, queue: str, attempt: int) -> None:
        if not queue.startswith("render."):
            raise ValueError(f"queue must be a registered render.<model_key> queue, got {queue!r}")
        q = Queue(queue, routing_key=queue)
        self.app.send_task(RENDER_TASK, args=[job_id, attempt], task_id=job_id, queue=q, routing_key=queue)
