"""Plain ASGI middleware: request ids, the body size limit and access logs.

Written against ASGI directly (not BaseHTTPMiddleware) so streams pass through
untouched and each request pays a few microseconds, not a task hop.
"""

import re
import secrets
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import AppError, PayloadTooLargeError, error_response
from app.core.logging import get_logger, request_id_var
from app.core.metrics import Metrics
from app.core.security import bearer_token

log = get_logger("access")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so that FastAPI's body reader lets it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"Request body is larger than the limit of {limit} bytes.")


def route_template(scope: Scope) -> str:
    """The matched route's template (`/api/v1/chats/{chat_id}`), never the raw path: ids would make
    a metrics series per object. Requests that matched no route share one label."""
    if "endpoint" not in scope:
        return "unmatched"
    segments = scope["path"].split("/")
    for name, value in scope.get("path_params", {}).items():
        parts = str(value).split("/")
        for i in range(len(segments) - len(parts), -1, -1):
            if segments[i : i + len(parts)] == parts:
                segments[i : i + len(parts)] = ["{" + name + "}"]
                break
    return "/".join(segments)


class RequestContextMiddleware:
    """Tag every request with an id (echoed as `x-request-id`), cap its body, log its outcome,
    and turn away requests under `authenticated_prefixes` that carry no bearer key."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        authenticated_prefixes: tuple[str, ...] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.authenticated_prefixes = authenticated_prefixes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _CLIENT_REQUEST_ID.match(incoming) else f"req_{secrets.token_hex(12)}"
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        scope.setdefault("state", {})["started"] = started
        status = 0
        limit = self.max_body_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            if scope["path"].startswith(self.authenticated_prefixes):
                # Refuse a request with no usable key before its body is even parsed,
                # so it gets OpenAI's 401 and not a complaint about its JSON.
                try:
                    bearer_token(headers[b"authorization"].decode("latin-1") if b"authorization" in headers else None)
                except AppError as refusal:
                    await error_response(refusal)(scope, receive, send_with_id)
                    return
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _BodyTooLarge(limit)
            await self.app(scope, receive_capped, send_with_id)
        except _BodyTooLarge as too_large:
            if status == 0:
                await error_response(PayloadTooLargeError(str(too_large.detail)))(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            if self.metrics is not None:
                self.metrics.observe_http(scope["method"], route_template(scope), status, elapsed)
            request_id_var.reset(token)
