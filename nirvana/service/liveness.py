"""Worker liveness: each router and render process upserts a heartbeat row once its consumer is up, then every
``every_s`` seconds; ``live_workers`` counts the fresh ones (what ``/readyz`` reports and ``nirvana up`` waits
for)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from psycopg.rows import tuple_row

log = logging.getLogger(__name__)
ROLES = ("router", "render", "maintenance")


def worker_name(role: str) -> str:
    """This process's name in heartbeats and job rows: ``role@host:pid``."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def beat(pool: Any, name: str, role: str, queue: str) -> None:
    """Upsert the heartbeat of worker ``name``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO worker_heartbeats (name, role, queue) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, queue = EXCLUDED.queue, heartbeat_at = now()",
            (name, role, queue),
        )


def start_heartbeat(pool: Any, name: str, role: str, queue: str, every_s: float = 5.0) -> threading.Event:
    """Beat now, then in a daemon thread every ``every_s`` s; set the returned event to stop."""
    beat(pool, name, role, queue)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                beat(pool, name, role, queue)
            except Exception as e:  # pragma: no cover - transient DB failure
                log.warning("heartbeat of %s failed: %s", name, e)

    threading.Thread(target=loop, name=f"heartbeat-{role}", daemon=True).start()
    return stop


def prune(pool: Any, older_than_s: float = 86400.0) -> int:
    """Forget workers silent for ``older_than_s`` (stopped or dead processes)."""
    with pool.connection() as conn:
        cur = conn.execute(
            "DELETE FROM worker_heartbeats WHERE heartbeat_at < now() - make_interval(secs => %s)", (older_than_s,)
        )
        return int(cur.rowcount or 0)


def live_workers(pool: Any, max_age_s: float = 30.0) -> dict[str, int]:
    """Workers per role whose heartbeat is younger than ``max_age_s``."""
    with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT role, count(*) FROM worker_heartbeats "
            "WHERE heartbeat_at > now() - make_interval(secs => %s) GROUP BY role",
            (max_age_s,),
        ).fetchall()
    out = dict.fromkeys(ROLES, 0)
    out.update({str(r): int(n) for r, n in rows})
    return out
