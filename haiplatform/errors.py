"""The exceptions of the haiplatform package, grouped by theme.

    HaiError
    ├── ConfigError           the [haiplatform] section or a CLI setting is missing or wrong
    ├── DatabaseError         the scheduler database is unreachable or not migrated
    ├── JobSpecError          a job specification is invalid (the message names the field)
    ├── AccountError          a job's Unix account is missing or may not run jobs
    └── ApiError              the API answered with an error (status, message)
        ├── AuthError         401: no token, or a token nobody has
        ├── Forbidden         403: the token's user may not do this
        ├── NotFound          404: no such job, node or user
        ├── Conflict          409: the request clashes with the object's state
        ├── TooManyRequests   429: over a per-user limit (request rate, open log streams)
        └── Unavailable       the API could not be reached within the timeout
"""

from __future__ import annotations


class HaiError(Exception):
    """Base class of every error raised by the haiplatform package."""


class ConfigError(HaiError):
    """The [haiplatform] section, a token or a URL is missing or malformed."""


class AccountError(HaiError):
    """The Unix account a user's jobs run as is missing, cannot be created, or may not run jobs."""


class DatabaseError(HaiError):
    """The scheduler database is unreachable, or its schema is not at the expected revision."""


class JobSpecError(HaiError, ValueError):
    """A job specification is invalid; the message names the field and what was expected."""


class ApiError(HaiError):
    """The API answered a request with an error status."""

    status: int = 0

    def __init__(self, message: str, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        super().__init__(message)


class AuthError(ApiError):
    """401: the request had no token, or a token no active user has."""

    status = 401


class Forbidden(ApiError):
    """403: the authenticated user may not do this (not an admin, or someone else's job)."""

    status = 403


class NotFound(ApiError):
    """404: no such job, node, user or quota."""

    status = 404


class Conflict(ApiError):
    """409: the request clashes with the object's current state (stopping a finished job)."""

    status = 409


class TooManyRequests(ApiError):
    """429: over a per-user limit (the request rate, open log streams); the message names it."""

    status = 429


class Unavailable(ApiError):
    """The API could not be reached, or did not answer within the timeout."""

    status = 503


def error_for_status(status: int, message: str) -> ApiError:
    """The ApiError subclass for an HTTP status."""
    cls = {401: AuthError, 403: Forbidden, 404: NotFound, 409: Conflict, 429: TooManyRequests,
           503: Unavailable}.get(status, ApiError)
    return cls(message, status)
