"""How the cache's SQL gets a connection: pgvector types registered, autocommit with explicit transactions, and
transactions that lose a deadlock retried.

Invariants:
    * A connection handed out by :meth:`IndexConnection.connection` is in autocommit mode with the ``vector``
      type registered; every multi-statement change opens its own ``conn.transaction()``.
    * :func:`retry` re-runs a whole transaction (its callable), never part of one; only deadlocks and
      serialization failures are retried, a bounded number of times, with exponential backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

log = logging.getLogger(__name__)

T = TypeVar("T")


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Register pgvector types on a connection (use as a pool's ``configure`` callback)."""
    from pgvector.psycopg import register_vector

    register_vector(conn)


def _has_vector_adapter(conn: psycopg.Connection[Any]) -> bool:
    try:
        return conn.adapters.types.get("vector") is not None
    except Exception:  # pragma: no cover - defensive
        return False


def retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """``fn()`` (one whole transaction), re-run after a deadlock or serialization failure, at most
    ``attempts`` times in all."""
    for i in range(attempts):
        try:
            return fn()
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as e:
            if i == attempts - 1:
                raise
            log.info("retrying after %s", type(e).__name__)
            time.sleep(0.005 * (2**i))
    raise AssertionError("unreachable")


class IndexConnection:
    """Base of the cache index's parts: the pool they share and how a connection is taken from it.

    Args:
        pool: a psycopg pool (connections are used in autocommit mode with explicit transactions).
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            if not conn.autocommit:
                conn.commit()
                conn.autocommit = True
            if not _has_vector_adapter(conn):
                configure_connection(conn)
            yield conn
