"""``/readyz`` is public but says only ready / not ready and the role; the details (per-component status, errors,
served models, live workers) need an admin key. Its checks run at most once a second per process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from nirvana.config import Settings
from nirvana.embedded.postgres import free_port
from tests.security.conftest import MODEL, auth

BARE = {"status": "ready", "role": "api"}


def test_readyz_without_an_admin_key_says_only_ready(api: Any, make_key: Callable[..., str], db_pool: Any) -> None:
    from nirvana.service.keys import revoke_key

    revoked = make_key("ready-revoked")
    assert revoke_key(db_pool, revoked) == 1
    for headers in (
        {},
        auth(make_key("ready-user")),  # a valid user key: no details either
        auth("nv_" + "x" * 43),  # unknown: not a 401, a probe must not depend on auth
        {"X-API-Key": "garbage"},
        auth(revoked),
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ):
        r = api.get("/readyz", headers=headers)
        assert r.status_code == 200 and r.json() == BARE, (headers, r.text)


def test_readyz_details_for_admin_keys(api: Any, make_key: Callable[..., str]) -> None:
    admin = make_key("ready-admin", role="admin")
    for headers in (auth(admin), {"X-API-Key": admin}):
        r = api.get("/readyz", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready" and body["role"] == "api"
        checks = body["checks"]
        assert {checks[c] for c in ("database", "broker", "storage")} == {"ok"}
        assert MODEL in checks["models"] and {"router", "render"} <= set(checks["workers"])


def test_not_ready_hides_the_error_but_admins_see_it(
    make_settings: Callable[..., Settings], make_key: Callable[..., str]
) -> None:
    from api.app import create_app

    dead = f"redis://127.0.0.1:{free_port()}/0"  # the broker is down
    with TestClient(create_app(make_settings(broker_url=dead))) as app:
        r = app.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "not_ready", "role": "api"}, r.text
        for secret in ("127.0.0.1", "Error", "redis", "broker"):
            assert secret not in r.text
        r = app.get("/readyz", headers=auth(make_key("ready-admin-2", role="admin")))
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["broker"].startswith("error: ") and checks["database"] == checks["storage"] == "ok"


def test_readyz_checks_are_reused_for_a_second(make_settings: Callable[..., Settings]) -> None:
    """A flood of anonymous probes runs the dependency checks about once a second, not once per probe."""
    from api.app import create_app
    from api.routes.system import READY_CACHE_S

    with TestClient(create_app(make_settings())) as app:
        svc = app.app.state.service
        rounds = 0
        real = svc.check_database

        def counted() -> None:
            nonlocal rounds
            rounds += 1
            real()

        svc.check_database = counted
        t0 = time.monotonic()
        for _ in range(100):
            assert app.get("/readyz").status_code == 200
        elapsed = time.monotonic() - t0
    assert 1 <= rounds <= 1 + elapsed / READY_CACHE_S + 1, (rounds, elapsed)
