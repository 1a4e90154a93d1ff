"""Parallel replays: a function over a list of items, each call in a forked child process.

Owns :func:`forked_map`. The function and its item reach the child by fork, never pickled, so the function can be a
bound method of an object that holds the run's requests, embeddings and server (``bench trace``'s
:class:`~nirvana.bench.trace.runner.ReplayTasks`) without a module-level global for the children to read; only the
results, and a child's exception, travel back pickled.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


def _child(fn: Callable[[T], R], item: T, conn: Connection) -> None:
    """In the child: ``fn(item)``, then ``(True, result)`` or ``(False, exception)`` down ``conn``."""
    try:
        msg: tuple[bool, object] = (True, fn(item))
    except BaseException as e:  # the parent raises it (KeyboardInterrupt included)
        e.add_note("in a forked replay worker:\n" + traceback.format_exc())
        msg = (False, e)
    try:
        conn.send(msg)
    except Exception as e:  # an unpicklable result or exception: say what it was
        conn.send((False, RuntimeError(f"replay worker could not send its {'result' if msg[0] else 'error'}: {e!r}")))
    finally:
        conn.close()


def forked_map(fn: Callable[[T], R], items: Sequence[T], processes: int) -> Iterator[R]:
    """``fn(item)`` for every item, each in a forked child, at most ``processes`` at once; results as they finish.

    Children start in the order of ``items``. The first child that fails (an exception, or death without an
    answer) stops the map: the children still running are terminated and the error is raised here; so are they
    when the caller stops iterating early.

    Raises:
        ValueError: ``processes`` < 1.
        BaseException: what ``fn`` raised in a child (with the child's traceback as a note), or RuntimeError for a
            child that died without an answer.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    ctx = mp.get_context("fork")
    queue = iter(items)
    running: dict[Connection, BaseProcess] = {}
    try:
        while True:
            for item in queue:
                recv, send = ctx.Pipe(duplex=False)
                child = ctx.Process(target=_child, args=(fn, item, send), daemon=True)
                child.start()
                send.close()  # the child holds the write end now: its exit closes the pipe
                running[recv] = child
                if len(running) >= processes:
                    break
            if not running:
                return
            for ready in wait(list(running)):
                conn = cast(Connection, ready)
                proc = running.pop(conn)
                try:
                    ok, value = conn.recv()
                except EOFError:  # it died before it could answer
                    ok, value = False, None
                conn.close()
                proc.join()
                if not ok:
                    raise value or RuntimeError(f"a replay worker died without an answer (exit {proc.exitcode})")
                yield value
    finally:
        for conn, proc in running.items():
            proc.terminate()
            proc.join()
            conn.close()
