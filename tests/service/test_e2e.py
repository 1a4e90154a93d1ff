"""End to end over real HTTP: real Postgres, Redis, Celery router/render worker processes and a real model."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from nirvana.service.client import ApiError, Client

pytestmark = pytest.mark.timeout(900)

BASE = "a small red circle on a white background, top left"
SIMILAR = "a tiny red circle on a white background, top left"


def test_submit_poll_png(client: Client) -> None:
    job = client.submit(prompt=BASE, steps=20)
    assert job["status"] in ("queued", "routing", "routed", "rendering", "done")
    assert isinstance(job["seed"], int)  # assigned and echoed
    done = client.wait(job["id"], timeout_s=120)
    assert done["status"] == "done", done
    assert done["cache"]["tier"] == "miss"
    assert done["progress"] == {"step": 20, "total": 20, "fraction": 1.0}
    t = done["timings"]
    assert t["queued_at"] and t["routed_at"] and t["rendering_at"] and t["done_at"]
    assert t["engine_s"] > 0 and t["total_s"] >= t["engine_s"]
    png = client.image(job["id"])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (done["width"], done["height"])


def test_similar_prompt_hits_approximate_then_exact_repeat(client: Client) -> None:
    first = client.generate(prompt=BASE + ", plain", seed=11, steps=20)
    assert first["status"] == "done"
    hit = client.generate(prompt=SIMILAR + ", plain", seed=12, steps=20)
    assert hit["status"] == "done", hit
    c = hit["cache"]
    assert c["tier"] == "approximate", c
    assert c["k"] > 0 and c["similarity"] > 0.65
    assert hit["steps_run"] == 20 - c["k"] and c["steps_saved"] == c["k"]
    assert c["source_job_id"] == first["id"]  # the caller's own job: may be named
    # exact repeat: same prompt, seed and parameters → the stored image, no render
    again = client.generate(prompt=SIMILAR + ", plain", seed=12, steps=20)
    assert again["cache"]["tier"] == "exact" and again["steps_run"] == 0
    assert client.image(again["id"]) == client.image(hit["id"])


def test_cache_off_renders_fully(client: Client) -> None:
    j = client.generate(prompt=BASE, seed=5, steps=10, cache="off")
    assert j["cache"]["tier"] == "miss" and j["steps_run"] == 10


def test_auth(stack: Any, make_key: Any) -> None:
    url = stack.api_url
    assert httpx.get(f"{url}/healthz").status_code == 200
    ready = httpx.get(f"{url}/readyz")  # no key: ready or not, nothing more
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "role": "api"}
    ready = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {make_key('ops', role='admin')}"})
    assert ready.json()["checks"]["workers"]["router"] >= 1 and ready.json()["checks"]["workers"]["render"] >= 1
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": "x"})
    assert r.status_code == 401
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer nv_nope"})
    assert r.status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    # another tenant's job is invisible; a non-admin cannot read every tenant's stats
    with Client(url, make_key("bob")) as bob, Client(url, make_key("carol")) as carol:
        j = bob.submit(prompt=BASE, steps=5)
        with pytest.raises(ApiError) as e:
            carol.job(j["id"])
        assert e.value.status == 404
        r = carol.http.get("/v1/cache/stats", params={"all": "true"})
        assert r.status_code == 403
        assert carol.http.post("/v1/cache/evict").status_code == 403
    # a revoked key is forbidden
    from nirvana.service.jobs import make_pool
    from nirvana.service.keys import revoke_key

    key = make_key("dave")
    pool = make_pool(stack.database_url, max_size=1, name="revoke")
    try:
        assert revoke_key(pool, key) == 1
    finally:
        pool.close()
    r = httpx.get(f"{url}/v1/cache/stats", headers={"X-API-Key": key})
    assert r.status_code == 403


def test_validation_names_the_field(client: Client) -> None:
    cases = [
        ({"prompt": "x" * 5000}, "prompt"),
        ({"prompt": "ok", "steps": 0}, "steps"),
        ({"prompt": "ok", "steps": 5000}, "steps"),
        ({"prompt": "ok", "width": 33}, "width"),
        ({"prompt": "ok", "height": 4096}, "height"),
        ({"prompt": "ok", "cache": "sometimes"}, "cache"),
        ({"prompt": "ok", "model": "nope"}, "model"),
        ({"prompt": "ok", "bogus": 1}, "bogus"),
        ({}, "prompt"),
    ]
    for body, field in cases:
        r = client.http.post("/v1/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.json())


def test_cancel_between_steps(client: Client) -> None:
    j = client.submit(prompt="a large blue square on a black background, center", steps=500, cache="off")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cur = client.job(j["id"])
        if cur["status"] == "rendering" and cur["progress"]["step"] > 0:
            break
        time.sleep(0.05)
    client.cancel(j["id"])
    final = client.wait(j["id"], timeout_s=60)
    assert final["status"] == "cancelled", final
    assert 0 < final["progress"]["step"] < 500
    with pytest.raises(ApiError) as e:
        client.image(j["id"])
    assert e.value.status == 404
    # cancelling a finished job changes nothing
    assert client.cancel(j["id"])["status"] == "cancelled"


def test_idempotency(client: Client) -> None:
    body = {"prompt": "a medium green diamond on a gray background, center", "steps": 5, "seed": 3}
    a = client.submit(idempotency_key="k-1", **body)
    b = client.submit(idempotency_key="k-1", **body)
    assert a["id"] == b["id"]
    r = client.http.post("/v1/jobs", json={**body, "seed": 4}, headers={"Idempotency-Key": "k-1"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "Idempotency-Key"
    c = client.submit(idempotency_key="k-2", **body)
    assert c["id"] != a["id"]
    client.wait(a["id"])


def test_idempotency_conflict_while_creating(stack: Any, client: Client) -> None:
    """A job row with the key exists but its task was not yet sent: a retry gets 409."""
    from nirvana.generation import GenerationRequest
    from nirvana.service.jobs import JobStore, NewJob, new_id, request_hash
    from nirvana.service.schemas import JobRequest

    req = JobRequest(prompt="a pending job", steps=5, seed=1)
    store = JobStore.connect(stack.database_url, max_size=1)
    try:
        job_row = client.submit(prompt="probe", steps=1)  # learn model_key and queue
        tenant = store.get(job_row["id"])["tenant"]
        full = store.get(job_row["id"])
        store.create(
            NewJob(
                id=new_id(),
                tenant=tenant,
                request=GenerationRequest(
                    prompt=req.prompt,
                    negative_prompt="",
                    seed=1,
                    steps=5,
                    guidance=full["guidance"],
                    width=full["width"],
                    height=full["height"],
                ),
                model=full["model"],
                model_key=full["model_key"],
                render_queue=full["render_queue"],
                cache_mode="auto",
                request_hash=request_hash(req.model_dump(mode="json")),
                idempotency_key="k-pending",
            )
        )
    finally:
        store.close()
    r = client.http.post(
        "/v1/jobs", json={"prompt": "a pending job", "steps": 5, "seed": 1}, headers={"Idempotency-Key": "k-pending"}
    )
    assert r.status_code == 409, r.text


def test_batch_of_50(client: Client) -> None:
    jobs = [
        {"prompt": f"a small {c} circle on a white background, center", "steps": 10, "seed": i}
        for i, c in enumerate(["red", "green", "blue", "yellow", "purple"] * 10)
    ]
    b = client.submit_batch(jobs)
    assert b["total"] == 50
    deadline = time.monotonic() + 600
    while True:
        cur = client.batch(b["id"])
        if cur["done"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert cur["done"], cur["counts"]
    assert cur["counts"] == {"done": 50}
    assert [j["index"] for j in cur["jobs"]] == list(range(50))
    assert all(j["image_url"] for j in cur["jobs"])


def test_batch_jsonl_upload_limits_and_cancel(client: Client) -> None:
    import json

    lines = "\n".join(
        json.dumps({"prompt": f"a big orange square, blue background, {i}", "steps": 400, "cache": "off"})
        for i in range(3)
    )
    b = client.submit_batch_jsonl(lines)
    assert b["total"] == 3
    cancelled = client.cancel_batch(b["id"])
    assert cancelled["cancel_requested"]
    deadline = time.monotonic() + 60
    while not client.batch(b["id"])["done"] and time.monotonic() < deadline:
        time.sleep(0.2)
    final = client.batch(b["id"])
    assert final["done"] and final["counts"].get("cancelled", 0) >= 2
    r = client.http.post("/v1/batches", json={"jobs": [{"prompt": "x"}] * 101})
    assert r.status_code == 422 and r.json()["error"]["field"] == "jobs"
    r = client.http.post("/v1/batches", json=[{"prompt": "ok"}, {"prompt": "ok", "steps": -1}])
    assert r.status_code == 422 and r.json()["error"]["field"] == "jobs[1].steps"


def test_openai_images(client: Client) -> None:
    import base64

    out = client.openai_generate(prompt="a small purple triangle on a white background", n=2, size="32x32", steps=5)
    assert len(out["data"]) == 2
    for d in out["data"]:
        assert Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size == (32, 32)
    out = client.openai_generate(prompt="a small purple triangle on a white background", response_format="url", steps=5)
    url = out["data"][0]["url"]
    assert client.http.get(url).headers["content-type"] == "image/png"


def test_metrics_and_stats(client: Client) -> None:
    text = client.metrics()
    for series in (
        "nirvana_jobs{",
        "nirvana_cache_hits_total{",
        "nirvana_cache_k_bucket",
        "nirvana_steps_saved_total",
        "nirvana_stage_seconds_bucket",
        "nirvana_gate_novel_total{",
    ):
        assert series in text, series
    s = client.cache_stats()
    assert s["jobs"]["done"] >= 1 and s["cache"]["prompts"] >= 1
    assert 0 <= s["jobs"]["hit_rate"] <= 1
