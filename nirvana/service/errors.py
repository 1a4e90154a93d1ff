"""Errors of the job service; the HTTP layer maps each to one status code."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FieldError(ServiceError):
    """A request field is invalid for this deployment (HTTP 422). ``field`` names it (dotted for nested)."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The resource is in a state that forbids the request now (HTTP 409); retrying later may succeed."""

    status = 409


class Unauthenticated(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class Unavailable(ServiceError):
    """A dependency (database, broker, storage) is down (HTTP 503)."""

    status = 503
