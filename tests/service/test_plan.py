"""The typed plan through the real router and renderer (Postgres, file store, tiny SD behind an engine loop):
the router's capture steps are the policy's, so at N = 15 and 35 a 0.70-similarity request finds the state it
asks for (with the old rounded capture steps it never could: K = 1 / 3 against stored 2 / 4)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nirvana.cache.store import LatentStore
from nirvana.config import Settings
from nirvana.engine.core import EngineCore
from nirvana.engine.loader import ModelComponents, load_model
from nirvana.engine.loop import EngineLoop
from nirvana.engine.tiny import build_tiny_sd
from nirvana.generation import GenerationRequest
from nirvana.pipeline.plan import RenderPlan
from nirvana.pipeline.renderer import Renderer
from nirvana.pipeline.router import Router
from nirvana.service.jobs import JobStore, NewJob
from nirvana.service.models import ServedModel
from tests.cache.helpers import at_similarity, make_cache, unit


class RecordingSender:
    """Stands in for the broker: the router and renderer here are called directly, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []

    def send_route(self, job_id: str) -> None:
        self.sent.append(("route", job_id, 0))

    def send_render(self, job_id: str, queue: str, attempt: int) -> None:
        self.sent.append((queue, job_id, attempt))


@pytest.fixture(scope="module")
def comps(tmp_path_factory: pytest.TempPathFactory) -> ModelComponents:
    return load_model(str(build_tiny_sd(tmp_path_factory.mktemp("m") / "tiny-sd")), device="cpu")


@pytest.fixture
def parts(pg_url: str, tmp_path: Path, comps: ModelComponents) -> Iterator[dict[str, Any]]:
    settings = Settings(database_url=pg_url, cache_novelty_gate=False)
    store = JobStore.connect(pg_url, max_size=4)
    cache = make_cache(pg_url, LatentStore(str(tmp_path / "blobs")), eviction="lru", budget_bytes=10**12)
    sender = RecordingSender()
    model = ServedModel.from_components("tiny", "tiny", comps)
    loop = EngineLoop(EngineCore(comps, max_batch=4)).start()
    try:
        yield {
            "store": store,
            "cache": cache,
            "sender": sender,
            "model": model,
            "router": Router(settings, store, cache, sender),
            "renderer": Renderer(settings, store, cache, loop, model, sender, name="render@test"),
        }
    finally:
        loop.stop()
        cache.close()
        store.close()


def _job(p: dict[str, Any], prompt: str, steps: int, emb: np.ndarray, tenant: str) -> str:
    jid = uuid.uuid4().hex
    m: ServedModel = p["model"]
    p["store"].create(NewJob(jid, tenant, GenerationRequest(prompt, "", 7, steps, 1.0, 32, 32), m.name,
                             m.model_key(32, 32), m.queue, "auto", jid))  # fmt: skip
    with p["store"].conn() as c:  # the embedding the router would compute: fixed here to set the similarity
        c.execute("UPDATE jobs SET embedding = %s WHERE id = %s", (emb.astype(np.float32).tobytes(), jid))
    return jid


@pytest.mark.parametrize("steps", [15, 35])
def test_capture_steps_come_from_the_policy_and_a_070_request_hits(parts: dict[str, Any], steps: int) -> None:
    rng = np.random.default_rng(steps)
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    a = unit(rng)
    src = _job(parts, "a red cat", steps, a, tenant)
    assert parts["router"].route(src) == "miss"
    plan = RenderPlan.from_row(parts["store"].get(src), shared_pool=False)
    assert plan.plan.capture_steps == tuple(parts["cache"].policy.cached_steps(steps))
    assert parts["renderer"].render(src, 0) == "done"

    hit = _job(parts, "a red dog", steps, at_similarity(a, 0.70, rng), tenant)
    assert parts["router"].route(hit) == "approximate"
    row = parts["store"].get(hit)
    want = 5 * steps // 50  # the paper's K = 5 band, floor-scaled: 1 at N = 15, 3 at N = 35
    assert (row["k_policy"], row["k"]) == (want, want)
    assert parts["renderer"].render(hit, 0) == "done"
    done = parts["store"].get(hit)
    assert done["status"] == "done" and done["tier"] == "approximate"
    assert (done["start_step"], done["steps_run"]) == (want, steps - want)


def test_a_rerun_after_a_worker_death_renders_alone(parts: dict[str, Any]) -> None:
    """A job whose worker died under it (the reaper sends it again) is rendered as a ``solo`` request — if a job
    in that batch killed the worker, the rerun cannot die with it again; a first attempt batches as usual."""
    store, renderer = parts["store"], parts["renderer"]
    seen: list[tuple[str, bool]] = []
    engine = renderer.engine

    class Spy:
        def run(self, req: Any) -> Any:
            seen.append((req.tag, req.solo))
            return engine.run(req)

    renderer.engine = Spy()
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    first = _job(parts, "a red cat", 10, unit(np.random.default_rng(1)), tenant)
    rerun = _job(parts, "a blue boat", 10, unit(np.random.default_rng(2)), tenant)
    for jid in (first, rerun):
        assert parts["router"].route(jid) == "miss"
    assert store.claim_render(rerun, 0, "render@died") is not None  # attempt 1 on a worker that then died
    with store.conn() as c:
        c.execute("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (rerun,))
    assert rerun in [r["id"] for r in store.reap(stale_s=5, requeue_s=600, max_attempts=3)["render"]]
    assert renderer.render(first, 0) == "done" and renderer.render(rerun, 1) == "done"
    assert seen == [(first, False), (rerun, True)]
    assert store.get(rerun)["attempts"] == 2
