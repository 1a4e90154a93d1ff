"""Beat scheduler alone: ``python -m workers.beat`` (eviction to budget, gate refit, reaper). Run exactly one
per deployment (``nirvana up`` runs it inside the router with ``--beat`` instead)."""

from __future__ import annotations

import sys

from nirvana.config import get_settings
from workers import process


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    s = get_settings()
    app, _ = process.build(s)  # beat only sends; its context is never used (nothing is built)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--schedule", str(s.data_dir / "celerybeat-schedule"), "-l", "INFO", *args])


if __name__ == "__main__":
    main()
