"""Hostile and malformed requests, one by one: each is a 4xx whose error names the field and the limit.

The app runs in-process with ``max_body_bytes`` = 64 KiB, ``max_batch_jobs`` = 50 and the default job limits
(``max_prompt_chars`` 1000, ``max_steps`` 200, ``max_image_size`` 1024, model size multiple 8).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.security.conftest import auth

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def key(make_key: Callable[..., str]) -> str:
    return make_key("mallory")


def error(r: Any, status: int, field: str | None = None, *needles: str) -> dict[str, Any]:
    """Assert ``r`` is ``status`` with the service's error shape naming ``field`` and containing ``needles``."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err: dict[str, Any] = r.json()["error"]
    assert err["type"] and err["message"], err
    if field is not None:
        assert err.get("field") == field, err
        assert field in err["message"], err
    for n in needles:
        assert n in err["message"], (n, err)
    return err


def post_job(api: Any, key: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return api.post("/v1/jobs", json=body, headers={**auth(key), **(headers or {})})


# ---------------------------------------------------------------------- body size and encoding
def test_oversized_body_with_content_length_is_413(api: Any, key: str) -> None:
    body = json.dumps({"prompt": "x" * (LIMIT + 1)}).encode()
    r = api.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    error(r, 413, "body", str(LIMIT))


def test_oversized_streamed_body_is_413(api: Any, key: str) -> None:
    """A chunked upload (no Content-Length) is cut off once it passes the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(LIMIT // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    r = api.post("/v1/jobs", content=chunks(), headers={**auth(key), "Content-Type": "application/json"})
    error(r, 413, "body", str(LIMIT))
    r = api.post("/v1/batches", content=chunks(), headers={**auth(key), "Content-Type": "application/jsonl"})
    error(r, 413, "body", str(LIMIT))


def test_empty_object_names_the_missing_field(api: Any, key: str) -> None:
    r = api.post("/v1/jobs", content=b"{}", headers={**auth(key), "Content-Type": "application/json"})
    error(r, 422, "prompt", "required")


def test_body_limit_middleware_refuses_a_bad_content_length() -> None:
    """Clients like httpx never send a malformed Content-Length, so the middleware is driven directly (ASGI)."""
    import asyncio

    from api.security import BodyLimitMiddleware

    reached: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": [(b"content-length", b"-5")]}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1024)(scope, receive, send))
    assert not reached
    assert sent[0]["status"] == 400
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["field"] == "Content-Length"


def test_invalid_utf8(api: Any, key: str) -> None:
    bad = b'{"prompt": "caf\xe9 \xff\xfe"}'
    r = api.post("/v1/jobs", content=bad, headers={**auth(key), "Content-Type": "application/json"})
    error(r, 400, "body", "UTF-8")
    r = api.post("/v1/batches", content=b"[" + bad + b"]", headers={**auth(key), "Content-Type": "application/json"})
    error(r, 422, "body", "UTF-8")
    r = api.post("/v1/batches", content=bad + b"\n", headers={**auth(key), "Content-Type": "application/jsonl"})
    error(r, 422, "body", "UTF-8")
    files = {"file": ("b.jsonl", bad + b"\n", "application/jsonl")}
    r = api.post("/v1/batches", files=files, headers=auth(key))
    error(r, 422, "file", "UTF-8")


def test_nul_and_lone_surrogates_in_text(api: Any, key: str) -> None:
    error(post_job(api, key, {"prompt": "a\u0000b"}), 422, "prompt", "NUL")
    r = api.post(
        "/v1/jobs", content=b'{"prompt": "a\\ud800b"}', headers={**auth(key), "Content-Type": "application/json"}
    )
    error(r, 422, "prompt")
    error(post_job(api, key, {"prompt": "ok", "negative_prompt": "\u0000"}), 422, "negative_prompt", "NUL")


def test_malformed_json(api: Any, key: str) -> None:
    r = api.post("/v1/jobs", content=b'{"prompt": ', headers={**auth(key), "Content-Type": "application/json"})
    error(r, 422, "body", "invalid JSON")
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than any JSON parser's recursion
    r = api.post("/v1/batches", content=deep[: LIMIT - 10], headers={**auth(key), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text  # truncated: not JSON
    nested = b"[" * 30_000 + b"]" * 30_000
    r = api.post("/v1/batches", content=nested, headers={**auth(key), "Content-Type": "application/json"})
    error(r, 422, "body", "nested too deeply")
    r = api.post("/v1/jobs", content=nested, headers={**auth(key), "Content-Type": "application/json"})
    error(r, 400, "body", "nested too deeply")
    r = api.post("/v1/jobs", json=["not", "an", "object"], headers=auth(key))
    error(r, 422, "body")


# ---------------------------------------------------------------------- job fields
def test_huge_prompt(api: Any, key: str) -> None:
    error(post_job(api, key, {"prompt": "p" * 1001}), 422, "prompt", "1000")
    error(post_job(api, key, {"prompt": "ok", "negative_prompt": "n" * 1001}), 422, "negative_prompt", "1000")
    error(post_job(api, key, {"prompt": ""}), 422, "prompt", "1")
    error(post_job(api, key, {"prompt": "   \n\t "}), 422, "prompt", "blank")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("steps", -1, "1"),
        ("steps", 0, "1"),
        ("steps", 201, "200"),  # over the deployment's max_steps
        ("steps", 10**30, "1000"),
        ("steps", 2.5, "integer"),
        ("steps", "50; DROP TABLE jobs", "integer"),
        ("width", -8, "1"),
        ("width", 0, "1"),
        ("width", 33, "multiple of 8"),
        ("width", 2048, "1024"),
        ("width", 10**9, "16384"),
        ("height", 4096, "1024"),
        ("guidance", -0.5, "0"),
        ("guidance", 51, "50"),
        ("guidance", 1e308, "100"),
        ("seed", -1, "0"),
        ("seed", 2**64, "9223372036854775807"),
        ("cache", "sometimes", "auto"),
        ("model", "no-such-model", "tiny"),
        ("model", "m" * 201, "200"),
    ],
)
def test_absurd_values_name_field_and_limit(api: Any, key: str, field: str, value: Any, needle: str) -> None:
    error(post_job(api, key, {"prompt": "a red cube", field: value}), 422, field, needle)


def test_nan_and_infinity(api: Any, key: str) -> None:
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"prompt": "x", "guidance": ' + token + b"}"
        r = api.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
        error(r, 422, "guidance")


def test_unknown_field_and_bad_ids_and_headers(api: Any, key: str) -> None:
    error(post_job(api, key, {"prompt": "x", "stesp": 5}), 422, "stesp")
    r = api.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd", headers=auth(key))
    assert r.status_code in (404, 422), r.text
    assert r.json()["error"]["message"]
    error(api.get("/v1/jobs/" + "a" * 65, headers=auth(key)), 422, "job_id")
    error(api.get("/v1/jobs/a%00b", headers=auth(key)), 422, "job_id")
    error(api.get("/v1/batches/a b", headers=auth(key)), 422, "batch_id")
    r = post_job(api, key, {"prompt": "x"}, headers={"Idempotency-Key": "k" * 201})
    error(r, 422, "Idempotency-Key", "200")
    error(api.get("/v1/cache/stats?all=maybe", headers=auth(key)), 422, "all")


def test_unknown_route_and_method(api: Any, key: str) -> None:
    err = error(api.get("/v1/nothing-here", headers=auth(key)), 404, "path")
    assert "/v1/nothing-here" in err["message"]
    err = error(api.put("/v1/jobs", json={}, headers=auth(key)), 405, "method")
    assert "POST" in err["message"]


def test_openai_endpoint_bounds(api: Any, key: str) -> None:
    url = "/v1/images/generations"
    error(api.post(url, json={"prompt": "x", "size": "99999x99999"}, headers=auth(key)), 422, "size", "1024")
    error(api.post(url, json={"prompt": "x", "size": "0x0"}, headers=auth(key)), 422, "size")
    error(api.post(url, json={"prompt": "x", "size": "33x32"}, headers=auth(key)), 422, "size", "multiple of 8")
    error(api.post(url, json={"prompt": "x", "size": "big"}, headers=auth(key)), 422, "size")
    error(api.post(url, json={"prompt": "x", "n": 11}, headers=auth(key)), 422, "n", "10")
    body = {"prompt": "x", "n": 2, "seed": 2**63 - 1}  # seed + 1 overflows
    error(api.post(url, json=body, headers=auth(key)), 422, "seed")


# ---------------------------------------------------------------------- batches
def jsonl(api: Any, key: str, text: str) -> Any:
    return api.post("/v1/batches", content=text.encode(), headers={**auth(key), "Content-Type": "application/jsonl"})


def test_malformed_jsonl_batches(api: Any, key: str) -> None:
    good = json.dumps({"prompt": "a blue sphere", "steps": 10})
    error(jsonl(api, key, f"{good}\nnot json\n"), 422, "jobs[1]", "line 2", "not JSON")
    error(jsonl(api, key, f"{good}\n\n{good[:-3]}\n"), 422, "jobs[1]", "line 3")
    error(jsonl(api, key, f'{good}\n{{"prompt": "x", "steps": -5}}\n'), 422, "jobs[1].steps", "1")
    error(jsonl(api, key, f'{good}\n{{"prompt": "x", "steps": 900}}\n'), 422, "jobs[1].steps", "200")
    error(jsonl(api, key, f"{good}\n42\n"), 422, "jobs[1]")
    error(jsonl(api, key, f'{good}\n["prompt"]\n'), 422, "jobs[1]")
    error(jsonl(api, key, f'{good}\n{{"prompt": "x", "width": 31}}\n'), 422, "jobs[1].width", "multiple of 8")
    error(jsonl(api, key, "\n\n  \n"), 422, "jobs", "at least one")
    error(jsonl(api, key, "\n".join([good] * 51)), 422, "jobs", "50")
    error(jsonl(api, key, "[" * 5000 + "]" * 5000), 422, "jobs[0]", "nested too deeply")
    # a BOM and CRLF line ends are fine
    r = api.post(
        "/v1/batches",
        content=("\ufeff" + good + "\r\n" + good + "\r\n").encode(),
        headers={**auth(key), "Content-Type": "application/jsonl"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["total"] == 2


def test_malformed_json_batches(api: Any, key: str) -> None:
    h = auth(key)
    error(api.post("/v1/batches", json={"jobs": "all of them"}, headers=h), 422, "jobs")
    error(api.post("/v1/batches", json=[], headers=h), 422, "jobs", "at least one")
    error(api.post("/v1/batches", json=[{"prompt": "x"}] * 51, headers=h), 422, "jobs", "50")
    error(api.post("/v1/batches", json=[{"prompt": "x"}, {"prompt": "y", "seed": -3}], headers=h), 422, "jobs[1].seed")
    error(api.post("/v1/batches", files={"other": ("b.jsonl", b"{}")}, headers=h), 422, "file")
    error(api.post("/v1/batches", content=b"{oops", headers={**h, "Content-Type": "application/json"}), 422, "body")
