"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis on Hypothesis).

Every operation of ``/openapi.json`` gets schema-valid (positive) and schema-violating (negative) requests, sent
with a valid (admin) API key to the real app in-process (real Postgres, real Redis broker). Each response must be:

* never a server error (5xx) — with one declared exception: ``POST /v1/images/generations`` waits for the
  rendered image, and no render worker runs here, so an accepted request ends in 504 "not finished within
  NIRVANA_OPENAI_WAIT_S"; that 504 is allowed only for that operation and only with that message;
* on 4xx, the service's error shape ``{"error": {"type", "message", "field"?}}`` whose message says what was
  wrong: 400/413/422 name the field, and a bound that was violated (``less_than_equal``, ``string_too_long``, ...)
  is stated with its number.

The CI run sends ``CI_CASES`` requests (about a minute); ``-m faults`` runs ``FAULTS_CASES``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis

from nirvana.config import Settings
from tests.security.conftest import auth

CI_CASES = int(os.environ.get("NIRVANA_FUZZ_CI_CASES", "1200"))
FAULTS_CASES = int(os.environ.get("NIRVANA_FUZZ_CASES", "10000"))

# Pydantic error types that mean "a bound was violated": the message must state the bound.
BOUND_ERRORS = {
    "less_than",
    "less_than_equal",
    "greater_than",
    "greater_than_equal",
    "string_too_long",
    "string_too_short",
    "too_long",
    "too_short",
}


@pytest.fixture(scope="module")
def fuzz_app(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    """The app under fuzzing; schemathesis runs its lifespan on first use and we shut it down after."""
    from api.app import create_app

    app = create_app(make_settings(max_body_bytes=256 * 1024))
    yield app
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()


def check_response(case: Any, status: int, body: Any) -> str | None:
    """Why this response breaks the contract (None when it does not)."""
    where = f"{case.method} {case.formatted_path}"
    if status >= 500:
        op = f"{case.method.upper()} {case.path}"
        if status == 504 and op == "POST /v1/images/generations":
            msg = (body or {}).get("error", {}).get("message", "")
            if "not finished within" in msg:
                return None
        return f"{where}: server error {status}: {body}"
    if status < 400:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not err.get("message") or not err.get("type"):
        return f"{where}: {status} without an error message: {body!r}"
    if status in (400, 413, 422):
        field = err.get("field")
        if not field:
            return f"{where}: {status} does not name the field: {err}"
        if field not in err["message"]:
            return f"{where}: {status} message does not mention the field {field!r}: {err}"
    if status == 422:
        for d in body.get("detail") or []:
            if d.get("type") in BOUND_ERRORS and not re.search(r"\d", d.get("message", "")):
                return f"{where}: 422 for a violated bound without the bound: {d}"
    return None


def run_fuzz(app: Any, key: str, cases: int, derandomize: bool) -> Counter[str]:
    """Send ``cases`` generated requests; returns status counts per operation (fails on the first violation)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schemathesis.serializer.alias("application/jsonl", "text/plain")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    strategy = st.one_of(
        schema.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
    )
    seen: Counter[str] = Counter()
    headers = auth(key)

    @settings(
        max_examples=cases,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.generate],  # report the first failing case as generated (no shrinking)
    )
    @given(case=strategy)
    def one(case: Any) -> None:
        response = case.call(headers=headers)
        try:
            body = response.json()
        except Exception:
            body = response.text
        problem = check_response(case, response.status_code, body)
        seen[f"{case.method.upper()} {case.path} {response.status_code}"] += 1
        seen["cases"] += 1
        assert problem is None, problem

    one()
    return seen


@pytest.mark.timeout(300)  # fail, not hang, if the in-process app stalls (1,200 cases took 51 s on 2 cores)
def test_fuzz_api_from_openapi_schema(fuzz_app: Any, make_key: Callable[..., str]) -> None:
    """≥ 1,000 generated requests over every operation: no 5xx, every 4xx says what was wrong."""
    seen = run_fuzz(fuzz_app, make_key("fuzz", role="admin"), CI_CASES, derandomize=True)
    summary = "\n".join(f"  {k}: {v}" for k, v in sorted(seen.items()))
    print(f"\nfuzz: {seen['cases']} cases\n{summary}")
    assert seen["cases"] >= 1000
    operations = {k.rsplit(" ", 1)[0] for k in seen if k != "cases"}
    # every operation of the schema was exercised
    paths = fuzz_app.openapi()["paths"]
    want = {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}
    assert want <= operations, want - operations
    # and requests got through validation, not only 4xx
    assert any(k.startswith("POST /v1/jobs 202") for k in seen), seen


@pytest.mark.faults
@pytest.mark.timeout(3600)
def test_fuzz_api_long(fuzz_app: Any, make_key: Callable[..., str], request: pytest.FixtureRequest) -> None:
    """The same with ``NIRVANA_FUZZ_CASES`` (default 10,000) random (not derandomized) cases; runs under
    ``pytest -m faults`` (``make test-faults``) or ``NIRVANA_FAULTS_FULL=1``."""
    expr = str(request.config.getoption("markexpr", "") or "")
    if not (("faults" in expr and "not faults" not in expr) or os.environ.get("NIRVANA_FAULTS_FULL") == "1"):
        pytest.skip("long fuzz: runs under `make test-faults` (pytest -m faults) or NIRVANA_FAULTS_FULL=1")
    seen = run_fuzz(fuzz_app, make_key("fuzz-long", role="admin"), FAULTS_CASES, derandomize=False)
    print(f"\nfuzz (long): {seen['cases']} cases")
    assert seen["cases"] >= FAULTS_CASES * 0.9
