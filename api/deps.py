"""Request dependencies: the service, the caller (API key → tenant, rate-limited) and the base URL for links.

The key schemes are declared as OpenAPI security schemes (``HTTPBearer`` and ``APIKeyHeader``), so the schema
shows which operations need a key and clients (and the fuzzer) send it as credentials, not as a parameter.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from nirvana.service.errors import Forbidden
from nirvana.service.keys import Principal
from nirvana.service.service import JobService

# Job and batch ids are server-made (uuid4 hex); a path id outside this pattern is a 422 naming it.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def service(request: Request) -> JobService:
    svc: JobService = request.app.state.service
    return svc


def principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
    x_api_key: Annotated[str | None, Depends(api_key_scheme)] = None,
) -> Principal:
    """The caller, from ``Authorization: Bearer <key>`` or ``X-API-Key``. 401 without a valid key, 403 for a
    revoked one, 429 (with ``Retry-After``) over the key's request rate."""
    key = bearer.credentials.strip() if bearer is not None else x_api_key
    svc: JobService = request.app.state.service
    p = svc.keys.verify(key)
    limiter = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        limiter.request(p.key_id)
    return p


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

__all__: list[Any] = ["ID_PATTERN", "Admin", "BaseURL", "Caller", "Service", "charge_jobs"]
