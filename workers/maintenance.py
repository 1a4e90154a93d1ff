"""Maintenance worker: ``python -m workers.maintenance [--beat] [celery worker options...]``.

Consumes the ``maintenance`` queue (eviction to budget, novelty-gate refit, the reaper, the orphan sweep a slice
at a time, retention), so a long eviction or sweep never delays routing. ``--beat`` also runs the beat scheduler
in this process (exactly one per deployment; ``python -m workers.beat`` runs it alone).
"""

from __future__ import annotations

import sys

from nirvana.config import get_settings
from nirvana.service.models import MAINTENANCE_QUEUE
from workers import process


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    process.setup_logging()
    app, ctx = process.build(get_settings())
    ctx.maintenance()  # connect before consuming
    process.serve(app, ctx, MAINTENANCE_QUEUE, "maintenance", ["--pool=solo"], args)


if __name__ == "__main__":
    main()
