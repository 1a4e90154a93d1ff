"""Beat scheduler alone: ``python -m workers.beat`` (eviction to budget, gate refit, reaper). Run exactly one
per deployment (``nirvana up`` runs it inside the router with ``--beat`` instead)."""

from __future__ import annotations

import sys

from workers import runtime
from workers.celery_app import make_celery


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    s = runtime.settings()
    app = make_celery(s)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--schedule", str(s.data_dir / "celerybeat-schedule"), "-l", "INFO", *args])


if __name__ == "__main__":
    main()
