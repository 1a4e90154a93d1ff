"""The render process's engine loop: one thread owns the :class:`EngineCore` (and so the model); any thread may
submit a request and wait for its row.

Why a thread and not a batch API: in the service, requests arrive one by one (a Celery task per job, several
tasks in flight when the worker prefetches up to the batch size). Each task thread submits its job and blocks on
the result; the loop admits it at the next iteration — a miss at step 0, a hit at its K — so nobody waits for a
batch to fill or for another request to finish.

Invariants:
    * Only the loop thread touches the core, the model and its schedulers.
    * Every submitted request gets exactly one result: finished, cancelled (``GenerationCancelled`` from its
      callback), or the exception that failed it (a failing batch fails only its own rows).
    * ``max_wait_ms``: when the loop was idle, the first arrival waits up to this long for company before the
      first iteration (arrivals later in a run join between iterations without waiting).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from nirvana.engine.core import EngineCore, RenderRequest, RowResult

log = logging.getLogger(__name__)


class EngineLoop:
    """Feeds an :class:`EngineCore` from other threads. Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, core: EngineCore, max_wait_ms: float = 0.0) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.core = core
        self.max_wait_s = max_wait_ms / 1000.0
        self._inbox: queue.Queue[tuple[RenderRequest, Future[RowResult]]] = queue.Queue()
        self._futures: dict[int, Future[RowResult]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.iterations = 0
        self.rows_stepped = 0

    @property
    def max_batch(self) -> int:
        return self.core.max_batch

    def start(self) -> EngineLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(self, req: RenderRequest) -> Future[RowResult]:
        """Queue ``req``; raises ``ValueError`` at once for input that can never run on this model."""
        if self._thread is None:
            raise RuntimeError("engine loop is not running (call start())")
        self.core.validate(req)
        fut: Future[RowResult] = Future()
        self._inbox.put((req, fut))
        return fut

    def run(self, req: RenderRequest) -> RowResult:
        """Submit ``req`` and wait for its row (the render task's call)."""
        return self.submit(req).result()

    # -- the loop thread ------------------------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        deadline = time.monotonic() + (self.max_wait_s if block else 0.0)
        while True:
            req, fut = item
            self._futures[id(req)] = fut
            try:
                self.core.submit(req)
            except ValueError as e:
                self._futures.pop(id(req)).set_exception(e)
            try:
                left = deadline - time.monotonic()
                item = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.core.has_work)
            if not self.core.has_work:
                continue
            try:
                results = self.core.step()
            except Exception as e:  # the core itself failed (e.g. the text encoder): fail what it held
                log.exception("engine loop iteration failed")
                results = []
                for req in [*self.core.waiting, *(r.req for r in self.core.active)]:
                    fut = self._futures.pop(id(req), None)
                    if fut is not None:
                        fut.set_exception(e)
                self.core.waiting.clear()
                self.core.active.clear()
            self.iterations += 1
            for res in results:
                fut = self._futures.pop(id(res.request), None)
                if fut is not None:
                    fut.set_result(res)
        # stopping: whatever is left gets an answer instead of hanging its caller
        while not self._inbox.empty():
            _, fut = self._inbox.get_nowait()
            self._futures[id(fut)] = fut
        for fut in self._futures.values():
            fut.set_exception(RuntimeError("engine loop stopped"))
        self._futures.clear()
