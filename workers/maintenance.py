"""Maintenance worker: ``python -m workers.maintenance [--beat] [celery worker options...]``.

Consumes the ``maintenance`` queue (eviction to budget, novelty-gate refit, the reaper, the orphan sweep a slice
at a time, retention), so a long eviction or sweep never delays routing. ``--beat`` also runs the beat scheduler
in this process (exactly one per deployment; ``python -m workers.beat`` runs it alone).
"""

from __future__ import annotations

import logging
import sys

from celery.signals import worker_ready

from nirvana.service.liveness import start_heartbeat
from nirvana.service.models import MAINTENANCE_QUEUE
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
    runtime.maintenance()  # connect before consuming
    store = runtime.store()

    @worker_ready.connect
    def _alive(**_: object) -> None:
        start_heartbeat(store.pool, worker_name("maintenance"), "maintenance", MAINTENANCE_QUEUE)

    argv_w = ["worker", "-Q", MAINTENANCE_QUEUE, "--pool=solo", "--prefetch-multiplier=1", "-n", "maintenance@%h"]
    argv_w += ["-l", "INFO"]
    if beat:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        argv_w += ["--beat", "--schedule", str(s.data_dir / "celerybeat-schedule")]
    app.worker_main([*argv_w, *args])


if __name__ == "__main__":
    main()
