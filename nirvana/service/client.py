"""A small synchronous HTTP client of the job service (used by ``nirvana demo``/``render`` and the tests).

Errors come back as ``ApiError`` with the HTTP status and the server's ``{"error": {...}}`` body.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

TERMINAL = frozenset({"done", "failed", "cancelled"})


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {err.get('message') or body}")
        self.status = status
        self.body = body
        self.field = err.get("field")


class Client:
    """``Client(base_url, api_key)``; thread-safe (one httpx connection pool)."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, rate_limit_retries: int = 5
    ) -> None:
        self.rate_limit_retries = rate_limit_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; a 429 (the key's rate limit) is retried after its ``Retry-After`` (at most
        ``rate_limit_retries`` times, each wait capped at 60 s)."""
        for _ in range(self.rate_limit_retries):
            r = self.http.request(method, url, **kwargs)
            if r.status_code != 429:
                return r
            try:
                wait = float(r.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(max(wait, 0.1), 60.0))
        return self.http.request(method, url, **kwargs)

    def _json(self, r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise ApiError(r.status_code, body)
        return body

    # ------------------------------------------------------------------ jobs
    def submit(self, idempotency_key: str | None = None, **request: Any) -> dict[str, Any]:
        """POST /v1/jobs with ``request`` fields (prompt, steps, seed, cache, ...)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = {k: v for k, v in request.items() if v is not None}
        out: dict[str, Any] = self._json(self._send("POST", "/v1/jobs", json=body, headers=headers))
        return out

    def job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("GET", f"/v1/jobs/{job_id}"))
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("DELETE", f"/v1/jobs/{job_id}"))
        return out

    def image(self, job_id: str) -> bytes:
        r = self._send("GET", f"/v1/jobs/{job_id}/image")
        if r.status_code >= 400:
            self._json(r)
        return r.content

    def wait(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Poll until the job is terminal; raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        delay = poll_s
        while True:
            j = self.job(job_id)
            if j["status"] in TERMINAL:
                return j
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {j['status']} after {timeout_s:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def generate(self, timeout_s: float = 300.0, **request: Any) -> dict[str, Any]:
        """Submit and wait."""
        return self.wait(self.submit(**request)["id"], timeout_s)

    # ------------------------------------------------------------------ batches
    def submit_batch(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("POST", "/v1/batches", json={"jobs": jobs}))
        return out

    def submit_batch_jsonl(self, jsonl: str) -> dict[str, Any]:
        files = {"file": ("batch.jsonl", jsonl.encode(), "application/jsonl")}
        out: dict[str, Any] = self._json(self._send("POST", "/v1/batches", files=files))
        return out

    def batch(self, batch_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("GET", f"/v1/batches/{batch_id}"))
        return out

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("DELETE", f"/v1/batches/{batch_id}"))
        return out

    # ------------------------------------------------------------------ misc
    def openai_generate(self, **body: Any) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("POST", "/v1/images/generations", json=body, timeout=600))
        return out

    def cache_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json(self._send("GET", "/v1/cache/stats"))
        return out

    def metrics(self) -> str:
        r = self._send("GET", "/metrics")
        if r.status_code >= 400:
            self._json(r)
        return r.text

    def ready(self) -> dict[str, Any]:
        r = self._send("GET", "/readyz")
        out: dict[str, Any] = r.json()
        return out
