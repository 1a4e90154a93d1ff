"""Authentication and tenant isolation, on the real app, database and cache.

* Every route of the app — enumerated from ``app.routes``, so a route added later is covered — answers 401
  without a key or with an unknown one and 403 with a revoked one; only the health routes (and the public API
  description: ``/openapi.json``, ``/docs``, ``/redoc``) answer without a key.
* Keys are stored as SHA-256 digests: no column of ``api_keys`` holds the key.
* Another tenant's job or batch is 404 for read, image and cancel; no response carries another tenant's prompt;
  cache statistics are the caller's own.
* Cache namespaces: a tenant never resumes from another tenant's state unless both opted into the shared pool
  (the namespace is chosen by the real job-creation path and read back by the real router/renderer helper).
* Storage keys are opaque digests: no user text (prompt, tenant) reaches an object key; ``..`` keys are refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.routing import APIRoute

from nirvana.config import Settings
from tests.security.conftest import auth

PUBLIC_API_ROUTES = {"/healthz", "/readyz"}
PUBLIC_DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
SECRET = "zebra-on-a-unicycle-7d3f"  # a prompt only bob ever sends


def _flat(routes: list[Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(full path, route) of every route, descending into included routers (FastAPI keeps them as nodes)."""
    out: list[tuple[str, Any]] = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            ctx_prefix = getattr(getattr(r, "include_context", None), "prefix", "") or ""
            out += _flat(inner.routes, prefix + ctx_prefix)
        else:
            out.append((prefix + r.path, r))
    return out


def _routes(app: Any) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) for every route; path parameters get a well-formed id nobody owns."""
    out = []
    for template, r in _flat(app.routes):
        methods = sorted(getattr(r, "methods", None) or [])
        path = re.sub(r"\{[^}]+\}", "0123456789abcdef0123456789abcdef", template)
        out += [(m, template, path) for m in methods if m != "HEAD"]
    return out


def test_every_endpoint_but_health_needs_a_key(api: Any, make_key: Callable[..., str], db_pool: Any) -> None:
    app = api.app
    routes = _flat(app.routes)
    api_paths = {p for p, r in routes if isinstance(r, APIRoute)}
    other_paths = {p for p, r in routes if not isinstance(r, APIRoute)}
    assert other_paths <= PUBLIC_DOCS, other_paths - PUBLIC_DOCS  # no non-API route slips in unguarded
    revoked = make_key("rita")
    from nirvana.service.keys import revoke_key

    assert revoke_key(db_pool, revoked) == 1
    checked = 0
    for method, template, path in _routes(app):
        if path in PUBLIC_DOCS:
            assert api.request(method, path).status_code == 200
            continue
        if template in PUBLIC_API_ROUTES:
            assert api.request(method, path).status_code in (200, 503), (method, path)
            continue
        assert template in api_paths
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer nv_not-a-key"}, 401),
            ({"X-API-Key": "nv_not-a-key"}, 401),
            ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
            (auth(revoked), 403),
            ({"X-API-Key": revoked}, 403),
        ):
            r = api.request(method, path, headers=headers, json={"prompt": "x"} if method == "POST" else None)
            assert r.status_code == status, (method, path, headers, r.status_code, r.text)
            assert r.json()["error"]["message"]
            if status == 401:
                assert r.headers.get("WWW-Authenticate") == "Bearer"
        checked += 1
    # the routes this deployment has today (the loop above covers any added later)
    assert checked >= 9
    # the OpenAPI schema declares the key schemes on every guarded operation, none on health
    spec = app.openapi()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            secured = bool(op.get("security"))
            assert secured == (path not in PUBLIC_API_ROUTES), (method, path)


def test_keys_are_stored_hashed(make_key: Callable[..., str], db_pool: Any) -> None:
    key = make_key("hasher")
    with db_pool.connection() as c:
        rows = c.execute("SELECT * FROM api_keys WHERE tenant = 'hasher'").fetchall()
    assert len(rows) == 1
    row = rows[0]
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    for col, v in row.items():
        assert key not in str(v), col
    assert row["prefix"] == key[:10] and len(key) >= 40  # 10 shown of >= 40 characters (256 random bits)


def test_reserved_and_odd_tenant_names_are_refused(db_pool: Any) -> None:
    from nirvana.cache.core import SHARED_TENANT as CORE_SHARED
    from nirvana.service.errors import FieldError
    from nirvana.service.keys import create_key
    from nirvana.service.tenants import SHARED_TENANT

    assert SHARED_TENANT == CORE_SHARED
    for bad in (SHARED_TENANT, "__anything", "", "a/b", "../x", "t" * 201, "tenant\u0000", "ténant"):
        with pytest.raises(FieldError):
            create_key(db_pool, bad)


def test_other_tenants_jobs_and_batches_are_invisible(api: Any, make_key: Callable[..., str]) -> None:
    bob, alice = make_key("bob"), make_key("alice")
    r = api.post("/v1/jobs", json={"prompt": SECRET, "steps": 5}, headers=auth(bob))
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    r = api.post("/v1/batches", json=[{"prompt": SECRET}], headers=auth(bob))
    assert r.status_code == 202, r.text
    batch = r.json()["id"]
    bodies = []
    for method, path in (
        ("GET", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/image"),
        ("DELETE", f"/v1/jobs/{job}"),
        ("GET", f"/v1/batches/{batch}"),
        ("DELETE", f"/v1/batches/{batch}"),
    ):
        r = api.request(method, path, headers=auth(alice))
        assert r.status_code == 404, (method, path, r.text)
        bodies.append(r.text)
    # alice's own requests never carry bob's prompt either
    r = api.post("/v1/jobs", json={"prompt": "a red cube", "steps": 5}, headers=auth(alice))
    bodies += [
        r.text,
        api.get("/v1/cache/stats", headers=auth(alice)).text,
        api.get("/metrics", headers=auth(alice)).text,
    ]
    assert not any(SECRET in b for b in bodies)
    # bob's job was not cancelled by alice's DELETE, and bob still sees it
    r = api.get(f"/v1/jobs/{job}", headers=auth(bob))
    assert r.status_code == 200 and r.json()["status"] != "cancelled" and r.json()["prompt"] == SECRET
    assert api.get(f"/v1/batches/{batch}", headers=auth(bob)).json()["cancel_requested"] is False


def test_cache_stats_are_the_callers_own(api: Any, make_key: Callable[..., str]) -> None:
    erin, frank = make_key("erin"), make_key("frank")
    for _ in range(3):
        assert api.post("/v1/jobs", json={"prompt": "a green tree"}, headers=auth(frank)).status_code == 202
    assert api.post("/v1/jobs", json={"prompt": "a blue sky"}, headers=auth(erin)).status_code == 202
    s = api.get("/v1/cache/stats", headers=auth(erin)).json()
    assert s["cache"]["tenant"] == "erin"
    assert s["jobs"]["jobs"] == 1
    assert api.get("/v1/cache/stats", params={"all": "true"}, headers=auth(erin)).status_code == 403
    assert api.get("/v1/cache/stats", headers=auth(frank)).json()["jobs"]["jobs"] == 3


# ---------------------------------------------------------------------- cache namespaces
@pytest.fixture(scope="module")
def cache(make_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The real cache facade on the module's database (requests carry embeddings: MiniLM is never loaded)."""
    from nirvana.cache.core import ApproximateCache
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.policy import KPolicy
    from nirvana.cache.store import LatentStore

    root = tmp_path_factory.mktemp("blobs")
    c = ApproximateCache(
        make_settings().database_url, LatentStore(str(root)), MiniLMEmbedder(), KPolicy.paper(), pool_size=2
    )
    yield c
    c.close()


def _job_row(api: Any, key: str, prompt: str, seed: int, db_pool: Any) -> dict[str, Any]:
    r = api.post("/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": 50}, headers=auth(key))
    assert r.status_code == 202, r.text
    with db_pool.connection() as c:
        row = c.execute("SELECT * FROM jobs WHERE id = %s", (r.json()["id"],)).fetchone()
    assert row is not None
    return dict(row)


def test_tenants_never_share_states_unless_both_opted_in(
    api: Any, make_key: Callable[..., str], db_pool: Any, cache: Any
) -> None:
    """Four tenants: gail and hank private, ivy and jack in the shared pool. The same prompt embedding (cosine
    1.0: the largest K) is looked up by each after one of them cached it."""
    from nirvana.pipeline.plan import cache_request
    from nirvana.pipeline.router import Router
    from nirvana.service.tenants import SHARED_TENANT, set_shared_pool
    from tests.cache.helpers import states

    keys = {t: make_key(t) for t in ("gail", "hank", "ivy", "jack")}
    set_shared_pool(db_pool, "ivy", True)
    set_shared_pool(db_pool, "jack", True)
    rng = np.random.default_rng(7)
    # one random direction per owner (nearly orthogonal in 384-d: each owner's probes match only its entry)
    embs = {t: rng.normal(size=384).astype(np.float32) for t in ("gail", "ivy", "jack")}
    embs = {t: e / np.linalg.norm(e) for t, e in embs.items()}

    def req(tenant: str, seed: int, emb: np.ndarray) -> tuple[dict[str, Any], Any]:
        row = _job_row(api, keys[tenant], f"{tenant}'s private scene", seed, db_pool)
        return row, replace(cache_request(row, shared_pool=False), embedding=emb)

    outcome: dict[tuple[str, str], str] = {}
    for owner in ("gail", "ivy"):
        row, r = req(owner, 1, embs[owner])
        assert row["cache_tenant"] == (SHARED_TENANT if owner == "ivy" else owner)
        cache.record(row["id"], r, states(r.namespace.model_key, [5, 10, 15, 20, 25]), b"png", None)
        for reader in ("gail", "hank", "ivy", "jack"):
            _, q = req(reader, 2, embs[owner])
            outcome[(owner, reader)] = cache.lookup(q).tier
    assert outcome == {
        ("gail", "gail"): "approximate",  # a tenant reuses its own states
        ("gail", "hank"): "miss",  # private states are the owner's only
        ("gail", "ivy"): "miss",  # ... even for a tenant in the shared pool
        ("gail", "jack"): "miss",
        ("ivy", "gail"): "miss",  # a private tenant never reads the shared pool
        ("ivy", "hank"): "miss",
        ("ivy", "ivy"): "approximate",
        ("ivy", "jack"): "approximate",  # both opted in
    }
    # a shared-pool hit names its source job only to its owner
    with db_pool.connection() as c:
        pid = c.execute(
            "SELECT p.id FROM cache_prompts p JOIN jobs j ON j.id = p.job_id WHERE j.tenant = 'ivy'"
        ).fetchone()["id"]
    router = Router(api.app.state.service.settings, api.app.state.service.store, cache, api.app.state.service.sender)
    assert router._source_job(pid, "jack") is None
    assert router._source_job(pid, "ivy") is not None
    # opting out takes effect for jobs created afterwards
    set_shared_pool(db_pool, "jack", False)
    row, q = req("jack", 3, embs["ivy"])
    assert row["cache_tenant"] == "jack" and cache.lookup(q).tier == "miss"


def test_storage_keys_never_contain_user_text(api: Any, make_key: Callable[..., str], db_pool: Any, cache: Any) -> None:
    from nirvana.cache.store import LatentStore
    from nirvana.pipeline.plan import cache_request
    from nirvana.service.service import image_key
    from tests.cache.helpers import states

    tenant = "evil..tenant@x"
    key = make_key(tenant)
    prompt = "../../../../etc/passwd %2e%2e/ C:\\Windows\\system32 $(rm -rf /) 'quoted' name.png"
    row = _job_row(api, key, prompt, 1, db_pool)
    r = replace(cache_request(row, shared_pool=False), embedding=np.ones(384, dtype=np.float32) / np.sqrt(384))
    cache.record(row["id"], r, states(r.namespace.model_key, [5, 10]), b"\x89PNG fake", None)
    keys = [image_key(tenant, row["id"])]
    with db_pool.connection() as c:
        keys += [u["uri"] for u in c.execute("SELECT uri FROM cache_blobs WHERE tenant = %s", (tenant,)).fetchall()]
    assert len(keys) >= 4  # job image + cache image + 2 states
    root = str(Path(cache.store.root))
    for k in keys:
        if k.startswith(("jobs/", "images/", "states/")):
            rel = k
        else:  # a full URI: the key must sit directly under the store's root
            assert root in k, (root, k)
            rel = k.split(root, 1)[1].lstrip("/")
        assert re.fullmatch(r"(jobs|images|states)(/[0-9a-f]{2,32})+(/k\d{4}\.nvl|\.png)", rel), rel
        assert "evil" not in k and "passwd" not in k and ".." not in k
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(ValueError):
            cache.store.put_bytes(bad, b"x")
    assert LatentStore.state_key("m", "../../t", "../j", 5).startswith("states/")


def test_shared_pool_jobs_report_no_similarity_to_other_tenants_prompts(
    api: Any, make_key: Callable[..., str], db_pool: Any
) -> None:
    """The cosine to the nearest cached prompt is reported for private jobs (the caller's own prompts) but not
    for shared-pool jobs whose source is not the caller's: it would be a search oracle for others' prompts."""
    from nirvana.service.tenants import set_shared_pool

    kim, lou = make_key("kim"), make_key("lou")
    set_shared_pool(db_pool, "lou", True)
    ids = {}
    for name, key in (("kim", kim), ("lou", lou)):
        r = api.post("/v1/jobs", json={"prompt": "a cat", "steps": 5}, headers=auth(key))
        ids[name] = r.json()["id"]
    with db_pool.connection() as c:  # as the router records a miss with its nearest neighbour's similarity
        c.execute("UPDATE jobs SET tier = 'miss', similarity = 0.61 WHERE id = ANY(%s)", (list(ids.values()),))
    assert api.get(f"/v1/jobs/{ids['kim']}", headers=auth(kim)).json()["cache"]["similarity"] == 0.61
    cache = api.get(f"/v1/jobs/{ids['lou']}", headers=auth(lou)).json()["cache"]
    assert cache["similarity"] is None and cache["tier"] == "miss"


def test_metrics_can_be_admin_only(make_settings: Callable[..., Settings], make_key: Callable[..., str]) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    user, admin = make_key("mia"), make_key("ops", role="admin")
    with TestClient(create_app(make_settings(metrics_admin_only=True))) as app:
        r = app.get("/metrics", headers=auth(user))
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        assert app.get("/metrics", headers=auth(admin)).status_code == 200
