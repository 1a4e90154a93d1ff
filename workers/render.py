"""Render worker: ``python -m workers.render [celery worker options...]``.

Loads the configured model once in this process (solo pool: no fork after loading), registers it in
``served_models`` and consumes its queue ``render.<model_key>`` with late acks. Up to ``NIRVANA_RENDER_MAX_BATCH``
tasks are in flight (a thread pool of that size, prefetch 1 per thread): each submits its job to the process's
engine loop, which denoises them together, and acks only after the job is finished — at-least-once as before.
One process per GPU; scale by starting more (``docker compose up --scale render=N``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from celery.signals import worker_ready

from nirvana.config import get_settings
from nirvana.service import models as served
from nirvana.service.liveness import start_heartbeat
from workers import process
from workers.context import FaultHooks, load_render_engine

log = logging.getLogger("workers.render")


def _keep_registered(pool: object, model: served.ServedModel, every_s: float = 15.0) -> None:
    stop = threading.Event()
    while not stop.wait(every_s):
        try:
            served.register(pool, model)
        except Exception as e:  # pragma: no cover - transient DB failure
            log.warning("served-model heartbeat failed: %s", e)


def main(argv: list[str] | None = None, fault_hooks: FaultHooks | None = None) -> None:
    """Run the worker; ``fault_hooks`` only from the fault suite's entry point (``tests/faults/render_worker.py``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    process.setup_logging()
    s = get_settings()
    # The queue name is the loaded model's key: load first, then build the app that declares the queue.
    app, ctx = process.build(s, render_engine=load_render_engine(s, fault_hooks), fault_hooks=fault_hooks)
    renderer = ctx.renderer()
    model = renderer.model
    store = ctx.store()

    @worker_ready.connect
    def _register(**_: object) -> None:
        # Registered once the consumer is up, so "registered" means "jobs sent now are consumed".
        served.register(store.pool, model)
        threading.Thread(target=_keep_registered, args=(store.pool, model), daemon=True).start()
        start_heartbeat(store.pool, renderer.name, "render", model.queue)

    log.info("serving model %s (%s) on queue %s", model.name, model.checkpoint_id, model.queue)
    name = os.environ.get("NIRVANA_WORKER_NAME", "render")
    app.worker_main(
        [
            "worker",
            "-Q",
            model.queue,
            # Threads, not prefork: the model lives once in this process, owned by the engine loop's thread.
            "--pool=threads",
            f"--concurrency={s.render_max_batch}",
            "--prefetch-multiplier=1",
            "-n",
            f"{name}@%h",
            "-l",
            "INFO",
            *args,
        ]
    )


if __name__ == "__main__":
    main()
