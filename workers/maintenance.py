"""Maintenance worker: ``python -m workers.maintenance [--beat] [celery worker options...]``.

Consumes the ``maintenance`` queue (eviction to budget, novelty-gate refit, the reaper, the orphan sweep a slice
at a time, retention), so a long eviction or sweep never delays routing. ``--beat`` also runs the beat scheduler
in this process (exactly one per deployment; ``python -m workers.beat`` runs it alone).
"""

from __future__ import annotations

import logging
import sys

from nirvana.service.models import MAINTENANCE_QUEUE
from workers import runtime
from workers.celery_app import make_celery


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_celery(runtime.settings())
    runtime.set_app(app)
    runtime.maintenance()  # connect before consuming
    runtime.serve(app, MAINTENANCE_QUEUE, "maintenance", ["--pool=solo"], args)


if __name__ == "__main__":
    main()
