"""Request dependencies: the service, the caller (API key → tenant) and the base URL for links."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from nirvana.service.errors import Forbidden
from nirvana.service.keys import Principal
from nirvana.service.service import JobService


def service(request: Request) -> JobService:
    svc: JobService = request.app.state.service
    return svc


def principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller, from ``Authorization: Bearer <key>`` or ``X-API-Key``. 401 without a valid key, 403 for a
    revoked one."""
    key = x_api_key
    if authorization:
        scheme, _, value = authorization.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else key
    svc: JobService = request.app.state.service
    return svc.keys.verify(key)


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.is_admin:
        raise Forbidden("this endpoint needs an admin key (nirvana keys create --role admin)")
    return p


def base_url(request: Request) -> str:
    svc: JobService = request.app.state.service
    return svc.settings.api_public_url.rstrip("/") or str(request.base_url).rstrip("/")


Service = Annotated[JobService, Depends(service)]
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
BaseURL = Annotated[str, Depends(base_url)]

__all__: list[Any] = ["Admin", "BaseURL", "Caller", "Service"]
