"""Router worker: ``python -m workers.router [--beat] [celery worker options...]``.

Consumes the ``route`` queue (CPU) with ``NIRVANA_ROUTE_MAX_BATCH`` task threads: embeds the prompts of the jobs
in flight together, runs each job's cache lookup, serves exact hits and sends the rest to their model's render
queue. ``--beat`` also runs the beat scheduler in this process (one per deployment).
"""

from __future__ import annotations

import sys

from nirvana.config import get_settings
from nirvana.service.models import ROUTE_QUEUE
from workers import process


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    process.setup_logging()
    s = get_settings()
    app, ctx = process.build(s)
    ctx.router()  # connect + load the embedder before consuming (first jobs are not slowed)
    ctx.cache().embed(["warm-up"])
    # Threads: up to route_max_batch route tasks at once, their prompts embedded in one call (Router docstring).
    process.serve(app, ctx, ROUTE_QUEUE, "router", ["--pool=threads", f"--concurrency={s.route_max_batch}"], args)


if __name__ == "__main__":
    main()
