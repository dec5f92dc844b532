"""Every exception the ranking API raises or handles, declared once, and the one function mapping them to HTTP.

Two families:

* ``ApiError``: the caller's problem or the service's state, answered as ``{"error": {"code", "message",
  "field"?}}`` with the status on the class (``BadRequest`` 400 names the offending field, ``PayloadTooLarge``
  413; ``HttpError`` 404/405 for a path or method no route takes; ``NotReady`` 503).
* ``DependencyError``: a backend failed (feature store, model). ``/v1/rank`` never lets these reach the client:
  each has a ``reason`` that becomes the response's fallback reason and the fallback counter's label. Should one
  escape a handler anyway it maps to 503, never to an opaque 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse


class ServingError(Exception):
    """Base of every serving exception."""


class ApiError(ServingError):
    status = 500
    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    """The request body is invalid; ``field`` names the offending member (``candidates[3]``, ``k``, ...)."""

    status = 400
    code = "bad_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class PayloadTooLarge(BadRequest):
    """The body is over the size any valid request can have (413)."""

    status = 413
    code = "payload_too_large"

    def __init__(self, message: str):
        super().__init__("body", message)


class HttpError(ApiError):
    """A request no route takes: no such path (404) or a wrong method (405)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class NotReady(ApiError):
    """A dependency is down (``checks`` says which); ``/readyz`` answers 503 so the load balancer moves on."""

    status = 503
    code = "not_ready"

    def __init__(self, message: str, checks: dict[str, Any] | None = None):
        super().__init__(message)
        self.checks = checks or {}

    def body(self) -> dict[str, Any]:
        return {"ready": False, "checks": self.checks, "error": {"code": self.code, "message": self.message}}


class DependencyError(ServingError):
    """A dependency failed; ``reason`` labels the fallback."""

    reason = "dependency_error"


class StoreUnavailable(DependencyError):
    """The feature store cannot be reached or answered garbage."""

    reason = "feature_store_unavailable"


class ModelError(DependencyError):
    """The model backend did not produce usable scores."""

    reason = "model_error"


class ModelTimeout(ModelError):
    reason = "timeout"


class ModelUnavailable(ModelError):
    """Connection refused/reset, 5xx, AWS client errors: worth a retry while the budget lasts."""

    reason = "model_unavailable"


class ModelBadResponse(ModelError):
    """The answer does not follow the wire contract: not JSON, no scores, wrong shape, NaN."""

    reason = "bad_response"


class BreakerOpen(ModelError):
    reason = "breaker_open"


def error_response(exc: Exception, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one place an exception becomes an HTTP response (``headers``: e.g. a 405's ``Allow``)."""
    if isinstance(exc, ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
    if isinstance(exc, DependencyError):
        return JSONResponse({"error": {"code": exc.reason, "message": str(exc)}}, status_code=503, headers=headers)
    return JSONResponse({"error": {"code": "internal", "message": "internal error"}}, status_code=500,
                        headers=headers)
