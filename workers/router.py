"""Router worker: ``python -m workers.router [--beat] [celery worker options...]``.

Consumes the ``route`` queue (CPU) with ``NIRVANA_ROUTE_MAX_BATCH`` task threads: embeds the prompts of the jobs
in flight together, runs each job's cache lookup, serves exact hits and sends the rest to their model's render
queue. ``--beat`` also runs the beat scheduler in this process (one per deployment).
"""

from __future__ import annotations

import logging
import sys

from celery.signals import worker_ready

from nirvana.service.liveness import start_heartbeat
from nirvana.service.models import ROUTE_QUEUE
from nirvana.service.pipeline import worker_name
from workers import runtime
from workers.celery_app import make_celery


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = runtime.settings()
    app = make_celery(s)
    runtime.set_app(app)
    beat = "--beat" in args
    args = [a for a in args if a != "--beat"]
    runtime.router()  # connect + load the embedder before consuming (first jobs are not slowed)
    runtime.cache().embed(["warm-up"])
    store = runtime.store()

    @worker_ready.connect
    def _alive(**_: object) -> None:
        start_heartbeat(store.pool, worker_name("router"), "router", ROUTE_QUEUE)

    # Threads: up to route_max_batch route tasks at once, their prompts embedded in one call (Router docstring).
    argv_w = ["worker", "-Q", ROUTE_QUEUE, "--pool=threads", f"--concurrency={s.route_max_batch}"]
    argv_w += ["--prefetch-multiplier=1", "-n", "router@%h", "-l", "INFO"]
    if beat:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        argv_w += ["--beat", "--schedule", str(s.data_dir / "celerybeat-schedule")]
    app.worker_main([*argv_w, *args])


if __name__ == "__main__":
    main()
