"""Storage faults: missing, truncated and bit-flipped latents and images, and the storage endpoint down while a
job reads its cached state. Every fault is detected (checksums; an unreadable object is a miss) and the job
falls back to full generation and succeeds.

* Worker path, in process (the session's real Postgres, a file store, tiny SD behind the engine loop): each
  trial renders a source job through ``Router.route`` + ``Renderer.render``, injects one fault into exactly the
  object the next job's lookup will choose (the source's image for an exact repeat, its K state for a near
  prompt), then routes and renders that job with the production code: the fault must be detected and the job
  finish from noise, rendered once. The six corruption kinds rotate.
* Library level, S3: a real S3 endpoint (moto's server; the worker's client pointed at a refusing port) takes the
  endpoint-down trials between lookup and read.
* Stack level: the same kinds through the real services (router, render worker, file store), smaller in number.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nirvana.cache.core import ApproximateCache, CacheRequest, LookupResult, Namespace
from nirvana.cache.store import LatentStore
from nirvana.embedded.postgres import free_port
from tests.cache.helpers import at_similarity, make_cache, request, states, unit

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1800)]

KS = [5, 10, 15, 20, 25]
CORRUPTIONS = ("missing", "truncated", "bitflip")
KINDS = tuple(f"{obj}-{c}" for obj in ("state", "image") for c in CORRUPTIONS)
DOWN_FAULTS = 100  # endpoint-down trials (library level), part of the 1,000


def _corrupt(store: LatentStore, uri: str, kind: str, rng: np.random.Generator) -> None:
    """Inject one fault into the object at ``uri``: delete it, truncate it, or flip one bit."""
    fs, path = store._fs_path(uri)
    if kind.endswith("missing"):
        fs.rm_file(path)
        return
    data = bytearray(fs.cat_file(path))
    if kind.endswith("truncated"):
        data = data[: int(rng.integers(0, len(data)))]
    else:
        i = int(rng.integers(len(data)))
        data[i] ^= 1 << int(rng.integers(8))
    fs.pipe_file(path, bytes(data))


def _png(job: str) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + job.encode()


def _seed(cache: ApproximateCache, ns: Namespace, emb: np.ndarray, prompt: str) -> CacheRequest:
    """A full generation recorded in the cache (states at KS and its image); returns its request."""
    req = request(emb, ns, prompt=prompt, seed=1)
    job = f"src-{uuid.uuid4().hex}"
    assert cache.record(job, req, states(ns.model_key, KS, seed=len(prompt)), _png(job), cache.lookup(req))["recorded"]
    return req


def _job_request(kind: str, src: CacheRequest, ns: Namespace, rng: np.random.Generator) -> CacheRequest:
    """The job that will read the faulty object: an exact repeat (image kinds) or a near prompt (state kinds)."""
    if kind.startswith("image"):
        return src
    assert src.embedding is not None
    return request(at_similarity(src.embedding, 0.97, rng), ns, prompt=f"{src.prompt}, variant", seed=2)


def _target(cache: ApproximateCache, kind: str, hit: LookupResult) -> str:
    """The URI of the object the job will read."""
    if kind.startswith("image"):
        assert hit.tier == "exact" and hit.image_blob_id is not None, hit
        ref = cache.index.image_blob(hit.image_blob_id)
        assert ref is not None and ref[0] is not None
        return ref[0]
    assert hit.tier == "approximate" and hit.state_id is not None, hit
    row = cache.index.state_row(hit.state_id)
    assert row is not None and row.uri is not None
    return row.uri


def _load(cache: ApproximateCache, hit: LookupResult) -> Any:
    return cache.load_image(hit) if hit.tier == "exact" else cache.load_state(hit)


def _finish(cache: ApproximateCache, job: str, req: CacheRequest) -> None:
    """What the render worker does after a failed read: full generation (all steps captured) and the record."""
    out = cache.record(job, req, states(req.namespace.model_key, KS, seed=7), _png(job), None)
    assert out["recorded"] and out["states"] == len(KS), out


def test_storage_faults_through_the_render_worker_every_job_succeeds(
    new_database: Any, tmp_path: Path, scale: Any
) -> None:
    from nirvana.config import Settings
    from nirvana.engine.core import EngineCore
    from nirvana.engine.loader import load_model
    from nirvana.engine.loop import EngineLoop
    from nirvana.engine.tiny import build_tiny_sd
    from nirvana.generation import GenerationRequest
    from nirvana.pipeline.renderer import Renderer
    from nirvana.pipeline.router import Router
    from nirvana.service.jobs import JobStore, NewJob
    from nirvana.service.models import ServedModel
    from tests.service.test_plan import RecordingSender

    n = scale.storage_faults - DOWN_FAULTS
    steps = 6  # cached_steps(6) = [1, 2, 3]: a 0.97-similar prompt resumes the k = 3 state
    rng = np.random.default_rng(7)
    url = new_database()
    comps = load_model(str(build_tiny_sd(tmp_path / "tiny-sd")), device="cpu")
    model = ServedModel.from_components("tiny", "tiny", comps)
    settings = Settings(database_url=url, cache_novelty_gate=False)
    store = JobStore.connect(url, max_size=4)
    cache = make_cache(url, LatentStore(str(tmp_path / "blobs")), budget_bytes=10**12, eviction="lru")
    sender = RecordingSender()
    loop = EngineLoop(EngineCore(comps, max_batch=4)).start()
    router = Router(settings, store, cache, sender)
    renderer = Renderer(settings, store, cache, loop, model, sender, name="render@storage-faults")

    def job(prompt: str, seed: int, emb: np.ndarray) -> str:
        jid = uuid.uuid4().hex
        store.create(NewJob(jid, "storage", GenerationRequest(prompt, "", seed, steps, 1.0, 32, 32), "tiny",
                            model.model_key(32, 32), model.queue, "auto", jid))  # fmt: skip
        with store.conn() as c:
            c.execute("UPDATE jobs SET embedding = %s WHERE id = %s", (emb.astype(np.float32).tobytes(), jid))
        return jid

    injected: Counter[str] = Counter()
    detected: Counter[str] = Counter()
    failed: list[str] = []
    try:
        for i in range(n):
            kind = KINDS[i % len(KINDS)]
            emb = unit(rng)
            src = job(f"scene {i}", 1, emb)
            assert router.route(src) == "miss" and renderer.render(src, 0) == "done"
            if kind.startswith("image"):  # an exact repeat reads the source's image
                jid = job(f"scene {i}", 1, emb)
                uri = _one_id(store, IMAGE_URI_SQL, src)
            else:  # a near prompt resumes the source's k = 3 state
                jid = job(f"scene {i}, variant", 2, at_similarity(emb, 0.97, rng))
                uri = _one_id(store, STATE_URI_SQL, src)
            _corrupt(cache.store, uri, kind, rng)
            injected[kind] += 1
            try:
                tier = router.route(jid)
                if tier != "miss":
                    assert tier == "approximate" and kind.startswith("state"), (kind, tier)
                    assert renderer.render(jid, 0) == "done"
                else:  # the router found the image unreadable: a miss it sends to render
                    assert kind.startswith("image"), (kind, tier)
                    assert renderer.render(jid, 0) == "done"
                row = store.get(jid)
                assert (row["status"], row["attempts"], row["tier"], row["start_step"]) == ("done", 1, "miss", 0), row
                if kind.startswith("state"):
                    assert row["cache_fallback"] == "missing", row["cache_fallback"]
                detected[kind] += 1
            except Exception as e:  # a failed job
                failed.append(f"{kind}: {type(e).__name__}: {e}")
    finally:
        loop.stop()
        cache.close()
        store.close()
    print(f"\nstorage faults (render worker path, file store): {sum(injected.values())} injected {dict(injected)}, "
          f"{sum(detected.values())} detected, {len(failed)} failed jobs")  # fmt: skip
    assert failed == []
    assert detected == injected
    assert sum(injected.values()) == n


IMAGE_URI_SQL = "SELECT b.uri FROM cache_prompts p JOIN cache_blobs b ON b.id = p.image_blob_id WHERE p.job_id = %s"
STATE_URI_SQL = (
    "SELECT b.uri FROM cache_states s JOIN cache_blobs b ON b.id = s.blob_id "
    "JOIN cache_prompts p ON p.id = s.prompt_id WHERE p.job_id = %s AND s.k = 3"
)


def _one_id(store: Any, sql: str, arg: str) -> Any:
    with store.conn() as c:
        row = c.execute(sql, (arg,)).fetchone()
    assert row is not None, (sql, arg)
    return next(iter(row.values()))


def test_storage_endpoint_down_jobs_fall_back(new_database: Any, s3_endpoint: str) -> None:
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    # Client retries shortened so a refused connection fails in milliseconds (production keeps the defaults:
    # the outcome, a miss, is the same, only slower).
    fast_fail = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
    store = LatentStore(f"s3://{bucket}", storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    store.fs.mkdir(bucket)
    # The same bucket behind an endpoint that refuses connections: what a worker sees while S3 is down (stopping
    # the moto server would not do: it keeps serving open keep-alive connections).
    down = LatentStore(
        f"s3://{bucket}",
        storage_options={"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}, **fast_fail},
    )
    down.fs.retries = 1
    rng = np.random.default_rng(11)
    cache = make_cache(new_database(), store, budget_bytes=10**12)
    ns = Namespace("faults-s3-32x32-ddim", "storage")
    kinds = ("state-endpoint-down", "image-endpoint-down")
    plans = []
    failed: list[str] = []
    try:
        for i in range(DOWN_FAULTS):
            kind = kinds[i % 2]
            src = _seed(cache, ns, unit(rng), f"s3 scene {i}")
            req = _job_request(kind, src, ns, rng)
            hit = cache.lookup(req)
            _target(cache, kind, hit)
            plans.append((kind, req, hit))
        cache.store = down  # the endpoint goes down between the lookups and the reads
        results = [(kind, _load(cache, hit)) for kind, _req, hit in plans]
        cache.store = store  # back before the workers write their results
        for i, (kind, req, hit) in enumerate(plans):
            try:
                _finish(cache, f"s3-job-{i}", req)
                # An unreadable object is a miss but its rows stay: readable again once the endpoint is back.
                assert _load(cache, hit) is not None
            except Exception as e:
                failed.append(f"{kind}: {type(e).__name__}: {e}")
    finally:
        cache.close()
    detected = Counter(kind for kind, got in results if got is None)
    print(f"\nstorage endpoint down (library, S3): {len(plans)} injected, {sum(detected.values())} fell back to full "
          f"generation, {len(failed)} failed jobs")  # fmt: skip
    assert failed == []
    assert detected == Counter(kind for kind, _, _ in plans)


# ---------------------------------------------------------------------- through the real stack
SRC = "a large yellow diamond on a gray background"


def _blob_paths(fs: Any, job_id: str, kind: str) -> list[Path]:
    if kind.startswith("state"):
        rows = fs.sql(
            "SELECT b.uri FROM cache_states s JOIN cache_blobs b ON b.id = s.blob_id "
            "JOIN cache_prompts p ON p.id = s.prompt_id WHERE p.job_id = %s AND NOT s.borrowed",
            (job_id,),
        )
    else:
        rows = fs.sql(
            "SELECT b.uri FROM cache_prompts p JOIN cache_blobs b ON b.id = p.image_blob_id WHERE p.job_id = %s",
            (job_id,),
        )
    return [Path(r["uri"].removeprefix("file://")) for r in rows]


def test_storage_faults_through_the_stack(fault_stack: Any, client_of: Any) -> None:
    fs = fault_stack
    store = LatentStore(fs.stack.storage_url)
    rng = np.random.default_rng(3)
    clients = {kind: client_of(f"storage-{kind}") for kind in KINDS}
    # One tenant per kind: namespaces are per tenant, so each job can only resume from its own source.
    src = {kind: c.submit(prompt=SRC, steps=20, seed=5, cache="auto") for kind, c in clients.items()}
    for kind, c in clients.items():
        assert c.wait(src[kind]["id"], timeout_s=600)["status"] == "done"
    injected = 0
    for kind in KINDS:
        paths = _blob_paths(fs, src[kind]["id"], kind)  # recorded before the job was done
        assert paths, kind
        for p in paths:  # every object the job could pick is faulty
            _corrupt(store, str(p), kind, rng)
            injected += 1
    jobs = {}
    for kind, c in clients.items():
        prompt = SRC if kind.startswith("image") else f"{SRC}, seen from the left"
        jobs[kind] = c.submit(prompt=prompt, steps=20, seed=5 if kind.startswith("image") else 6, cache="auto")
    for kind, c in clients.items():
        j = c.wait(jobs[kind]["id"], timeout_s=600)
        assert j["status"] == "done" and j["attempts"] == 1, (kind, j)
        assert j["steps_run"] == 20, (kind, j)  # full generation
        assert c.image(j["id"])[:8] == b"\x89PNG\r\n\x1a\n"
        row = fs.sql("SELECT tier, k_policy, similarity FROM jobs WHERE id = %s", (j["id"],))[0]
        assert row["tier"] == "miss", (kind, row)
        if kind.startswith("state"):
            assert row["k_policy"] and row["k_policy"] > 0, (kind, row)  # planned to resume, then downgraded
    print(f"\nstorage faults (stack): {injected} objects corrupted over {len(KINDS)} kinds, {len(jobs)} jobs, 0 failed")
