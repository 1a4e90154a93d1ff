"""Request dependencies: the service, the caller (API key → tenant, rate-limited) and the base URL for links.

The key schemes are declared as OpenAPI security schemes (``HTTPBearer`` and ``APIKeyHeader``), so the schema
shows which operations need a key and clients (and the fuzzer) send it as credentials, not as a parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from nirvana.service.errors import Forbidden
from nirvana.service.keys import Principal
from nirvana.service.ratelimit import client_id
from nirvana.service.service import JobService

# Job and batch ids are server-made (uuid4 hex); a path id outside this pattern is a 422 naming it.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def service(request: Request) -> JobService:
    svc: JobService = request.app.state.service
    return svc


def authenticate(request: Request, key: str | None) -> Principal:
    """The principal of ``key``, charged to the rate limits.

    Order (why: the cheap refusals come first, so an unknown key reaches Postgres only within the client
    address's budget): no key or a malformed one → 401; a recently seen unknown key → 401; a key this process
    has never found → one token from the address's auth bucket (429 with ``Retry-After`` when empty), then the
    database; revoked → 403; then one token from the key's request bucket (429).
    """
    svc: JobService = request.app.state.service
    limiter = getattr(request.app.state, "limiter", None)
    guard: Callable[[], None] | None = None
    if limiter is not None:
        guard = partial(limiter.auth_lookup, client_id(request.client.host if request.client else None))
    p = svc.keys.verify(key, guard)
    if limiter is not None:
        limiter.request(p.key_id)
    return p


def key_from_headers(request: Request) -> str | None:
    """The key a request carries (``Authorization: Bearer`` first, then ``X-API-Key``), as ``principal`` reads
    it; None when there is none. For routes that only *optionally* take a key (``/readyz``)."""
    scheme, _, cred = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and cred.strip():
        return cred.strip()
    return request.headers.get("x-api-key") or None


def principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
    x_api_key: Annotated[str | None, Depends(api_key_scheme)] = None,
) -> Principal:
    """The caller, from ``Authorization: Bearer <key>`` or ``X-API-Key``. 401 without a valid key, 403 for a
    revoked one, 429 (with ``Retry-After``) over the key's request rate or the address's failed-auth rate."""
    key = bearer.credentials.strip() if bearer is not None else x_api_key
    return authenticate(request, key)


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.is_admin:
        raise Forbidden("this endpoint needs an admin key (nirvana keys create --role admin)")
    return p


def charge_jobs(request: Request, p: Principal, n: int) -> None:
    """Charge ``n`` jobs to the caller's job bucket (429 when over the rate; 422 when ``n`` exceeds the burst)."""
    limiter = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        limiter.create_jobs(p.key_id, n)


def base_url(request: Request) -> str:
    svc: JobService = request.app.state.service
    return svc.settings.api_public_url.rstrip("/") or str(request.base_url).rstrip("/")


Service = Annotated[JobService, Depends(service)]
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
BaseURL = Annotated[str, Depends(base_url)]

__all__: list[Any] = [
    "ID_PATTERN",
    "Admin",
    "BaseURL",
    "Caller",
    "Service",
    "authenticate",
    "charge_jobs",
    "key_from_headers",
]
