"""Micro-batching for calls that are much cheaper in bulk (the router's claim + embedding, and its plan writes).

Many threads each ``submit`` one item and block; one worker thread takes up to ``max_batch`` waiting items (after
the first arrives it waits at most ``max_wait_ms`` for more), calls ``fn`` once on the list and hands each caller
its own result. MiniLM embeds a batch of 32 trace prompts about 2.9x faster per prompt than one at a time on our
2-core machine (docs/BENCHMARKS.md, bench router), and a batch shares one claim and one plan-write round trip.

Invariants:
    * ``fn`` runs on the batcher's thread only (the model it uses is never shared between threads).
    * Every submitted item gets exactly one answer: its result, or the exception ``fn`` raised for its batch, or
      the exception ``fn`` returned as that item's result (one item's failure need not fail its batch).
    * Results keep the order of the items within a batch: ``fn(items)[i]`` belongs to ``items[i]``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Batches ``submit`` calls from many threads into calls of ``fn`` on one thread."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch: int,
        max_wait_ms: float = 5.0,
        name: str = "micro-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._inbox: queue.Queue[tuple[T, Future[R]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.batches = 0
        self.items = 0

    def submit(self, item: T) -> R:
        """``fn([item, ...])``'s answer for ``item`` (blocks until its batch ran)."""
        if self._stop.is_set():
            raise RuntimeError("micro-batcher is stopped")
        fut: Future[R] = Future()
        self._inbox.put((item, fut))
        return fut.result()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _take(self) -> list[tuple[T, Future[R]]]:
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            try:
                results = list(self.fn([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"batched call returned {len(results)} results for {len(batch)} items")
            except Exception as e:
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, fut), res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
