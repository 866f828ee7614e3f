"""The project's errors, rendered on every route in OpenAI's shape.

    AppError                      500 server_error
    ├── InvalidRequestError       400 invalid_request_error
    │   └── PayloadTooLargeError  413
    ├── AuthenticationError       401 invalid_request_error / invalid_api_key
    ├── PermissionDeniedError     403
    ├── NotFoundError             404
    ├── ConflictError             409
    ├── RateLimitError            429 (carries retry-after)
    ├── ServiceUnavailableError   503 (nothing configured to answer)
    └── UpstreamError             502 (the model provider failed us)
        └── UpstreamTimeoutError  504

Services raise these; one handler turns each into
`{"error": {"message", "type", "param", "code"}}` with its status.
"""

import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.core.logging import get_logger

log = get_logger(__name__)


class AppError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(AppError):
    status_code = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "request_too_large"


class AuthenticationError(AppError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(AppError):
    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(AppError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(AppError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitError(AppError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceededError(AppError):
    """OpenAI's answer to an account out of credit (here: a key over its budget)."""

    status_code = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailableError(AppError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamError(AppError):
    status_code = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


def error_response(error: AppError) -> Response:
    """Render an error in OpenAI's envelope; tell OpenAI's SDKs when a retry cannot help."""
    headers = dict(error.headers)
    # A client error will fail again; an upstream failure has already been retried here,
    # so an SDK retrying on top would only multiply the attempts.
    if (error.status_code < 500 and error.status_code not in (408, 409, 429)) or isinstance(error, UpstreamError):
        headers.setdefault("x-should-retry", "false")
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status_code,
        media_type="application/json",
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = str(first.get("msg", "Invalid value"))
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if param:
        message = f"Invalid value for '{param}': {message}."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


_HTTP_CODES = {400: "invalid_value", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route accepts at `path` (Starlette names only the first route's)."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods.update(m.upper() for m in operations)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, on every route, answer in OpenAI's shape."""

    async def on_app_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AppError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(InvalidRequestError(message, param=param, code="invalid_value"))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
            headers["allow"] = ", ".join(_allowed_methods(app, request.url.path))
        if exc.status_code == 400:  # FastAPI could not read the body (e.g. it is not UTF-8)
            message = "We could not parse the JSON body of your request."
        cls = InvalidRequestError if exc.status_code < 500 else AppError
        error = cls(message, code=_HTTP_CODES.get(exc.status_code), headers=headers)
        error.status_code = exc.status_code
        return error_response(error)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", exc_info=exc)
        return error_response(AppError("The server had an error while processing your request."))

    app.add_exception_handler(AppError, on_app_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
