"""The micro-batcher: concurrent submits share calls, each caller gets its own result, errors reach every caller
of the failing batch only."""

from __future__ import annotations

import threading

import pytest

from nirvana.pipeline.batcher import MicroBatcher


def test_concurrent_submits_share_calls_and_keep_their_results() -> None:
    calls: list[list[int]] = []

    def square(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return [x * x for x in xs]

    b = MicroBatcher(square, max_batch=8, max_wait_ms=50)
    out: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, b.submit(i))) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    b.stop()
    assert out == {i: i * i for i in range(20)}
    assert max(len(c) for c in calls) > 1 and all(len(c) <= 8 for c in calls)
    assert sum(len(c) for c in calls) == 20 and b.items == 20 and b.batches == len(calls)


def test_a_failing_batch_fails_its_callers_only() -> None:
    def fn(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise ValueError("unlucky")
        return xs

    b = MicroBatcher(fn, max_batch=1)
    with pytest.raises(ValueError, match="unlucky"):
        b.submit(13)
    assert b.submit(7) == 7  # the batcher survives
    b.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        b.submit(1)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(fn, max_batch=0)
