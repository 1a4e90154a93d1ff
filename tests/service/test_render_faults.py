"""Cache faults on the real render path (``Renderer.render`` over Postgres, a file store and tiny SD behind an
engine loop) never fail or re-render a good job: a state that cannot be loaded or is refused by the engine is a
miss for that job; a cache that cannot record leaves the job done."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
import torch

from nirvana.engine.state import CapturedState
from nirvana.pipeline.plan import cache_request
from nirvana.service.metrics import JobsCollector
from tests.cache.helpers import at_similarity, unit
from tests.service.test_plan import _job, comps, parts  # noqa: F401  (fixtures)


def _metric(store: Any, name: str, labels: dict[str, str] | None = None) -> float:
    for fam in JobsCollector(store.pool).collect():
        for s in fam.samples:
            if s.name == name and (labels is None or s.labels == labels):
                return float(s.value)
    raise KeyError(name)


def _source_then_hit(p: dict[str, Any], steps: int = 10) -> tuple[str, str]:
    """A rendered source job and a routed approximate hit on it (similarity 0.97: the largest K)."""
    rng = np.random.default_rng(len(uuid.uuid4().hex))
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    a = unit(rng)
    src = _job(p, "a red cat", steps, a, tenant)
    assert p["router"].route(src) == "miss" and p["renderer"].render(src, 0) == "done"
    hit = _job(p, "a red kitten", steps, at_similarity(a, 0.97, rng), tenant)
    assert p["router"].route(hit) == "approximate"
    return src, hit


def test_cache_failing_every_load_and_record_fails_no_job(parts: dict[str, Any]) -> None:  # noqa: F811
    p = parts
    _, hit = _source_then_hit(p)
    before = _metric(p["store"], "nirvana_cache_fallbacks_total", {"reason": "error"})
    p["renderer"].record_retry_delays_s = (0.01, 0.01)
    p["cache"].close()  # the cache's database pool is gone: every load_state and record raises from here on
    assert p["renderer"].render(hit, 0) == "done"
    row = p["store"].get(hit)
    assert row["status"] == "done" and row["attempts"] == 1  # rendered once, not re-rendered
    assert (row["tier"], row["start_step"], row["steps_run"]) == ("miss", 0, 10)
    assert row["cache_fallback"] == "error" and "closed" in (row["cache_record_error"] or "").lower()
    assert row["image_uri"].endswith(".a1.png")  # the attempt is in the key
    assert _metric(p["store"], "nirvana_cache_fallbacks_total", {"reason": "error"}) == before + 1
    assert _metric(p["store"], "nirvana_cache_record_failures_total") >= 1


def test_state_refused_by_the_engine_renders_from_noise(parts: dict[str, Any]) -> None:  # noqa: F811
    """A stored state of the wrong shape (the engine's check refuses it) is a miss, not an invalid request."""
    p = parts
    rng = np.random.default_rng(5)
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    a = unit(rng)
    src = _job(p, "a blue dog", 10, a, tenant)
    assert p["router"].route(src) == "miss"
    req = cache_request(p["store"].get(src), shared_pool=False)
    bad = [CapturedState(torch.zeros(4, 4, 4), k, 10, 500.0, "ddim", req.namespace.model_key) for k in (1, 2, 3, 4, 5)]
    p["cache"].record(src, req, bad, None, None)
    hit = _job(p, "a blue puppy", 10, at_similarity(a, 0.97, rng), tenant)
    assert p["router"].route(hit) == "approximate"
    assert p["renderer"].render(hit, 0) == "done"
    row = p["store"].get(hit)
    assert (row["status"], row["attempts"], row["tier"], row["cache_fallback"]) == ("done", 1, "miss", "rejected")
    assert row["start_step"] == 0 and row["error"] is None


def test_missing_state_is_a_miss(parts: dict[str, Any]) -> None:  # noqa: F811
    p = parts
    _, hit = _source_then_hit(p)
    with p["store"].conn() as c:  # evicted between routing and rendering
        c.execute("DELETE FROM cache_states WHERE id = (SELECT state_id FROM jobs WHERE id = %s)", (hit,))
    assert p["renderer"].render(hit, 0) == "done"
    row = p["store"].get(hit)
    assert (row["status"], row["tier"], row["cache_fallback"], row["attempts"]) == ("done", "miss", "missing", 1)


@pytest.mark.parametrize(("codec", "levels"), [("fp16-zstd", 2), ("int8-zstd", 3)])
def test_resume_through_the_production_codecs(parts: dict[str, Any], comps: Any, codec: str, levels: int) -> None:  # noqa: F811
    """A hit resumes the state as the store's codec gave it back: its PNG stays within a few 8-bit levels of
    the same request resumed from the exact latent, far closer than the same request rendered from noise."""
    from PIL import Image

    from nirvana.engine.core import EngineCore, RenderRequest
    from nirvana.engine.engine import to_pil

    p = parts
    p["cache"].codec = codec
    _, hit = _source_then_hit(p)
    assert p["renderer"].render(hit, 0) == "done"
    row = p["store"].get(hit)
    assert row["tier"] == "approximate" and row["cache_fallback"] is None and row["start_step"] > 0
    k = int(row["start_step"])
    got = np.asarray(Image.open(__import__("io").BytesIO(p["cache"].store.get_bytes(row["image_uri"]))), dtype=int)
    core = EngineCore(comps, max_batch=1)
    (s,) = core.run([RenderRequest("a red cat", seed=7, steps=10, guidance=1.0, capture=(k,))])
    exact, noise = core.run(
        [
            RenderRequest("a red kitten", seed=7, steps=10, guidance=1.0, start=s.states[0]),
            RenderRequest("a red kitten", seed=7, steps=10, guidance=1.0),
        ]
    )
    ref = [np.asarray(to_pil(r.image.unsqueeze(0))[0], dtype=int) for r in (exact, noise)]  # type: ignore[union-attr]
    d_exact, d_noise = np.abs(got - ref[0]).max(), np.abs(got - ref[1]).max()
    assert d_exact <= levels < d_noise, (codec, d_exact, d_noise)
