"""Raw access to the upstream for the `/v1` pass-through.

The drop-in endpoint relays the upstream's bytes rather than rebuilding them,
so it talks to the upstream with the lean client in `http_client.py` (no SDK
models to parse and re-serialise on every chunk, and a fraction of httpx2's
CPU). Retries follow the same policy as the SDK path (`app/services/retries.py`):
at most `1 + OPENAI_MAX_RETRIES` attempts, `retry-after` honoured, never after a
stream's body has begun.
"""

import asyncio
import time
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request

from app.core.config import Settings
from app.core.errors import AppError, RateLimitError, UpstreamError, UpstreamTimeoutError
from app.core.logging import get_logger
from app.db.models import utcnow
from app.services.http_client import HTTPClient, Response, TransportError, TransportTimeout, environment_proxy
from app.services.openai import Attempt
from app.services.retries import retry_delay

log = get_logger(__name__)

MODELS_TTL_SECONDS = 60.0


class UpstreamFailure(Exception):
    """The upstream answered with an error status; its bytes are kept to relay."""

    def __init__(self, status_code: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"upstream answered {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class Proxy:
    """Raw access to the upstream's OpenAI-compatible API."""

    def __init__(self, settings: Settings, base_url: str, api_key: str) -> None:
        self._settings = settings
        proxy = environment_proxy(base_url)
        if proxy is not None and not proxy.startswith("http://"):
            log.warning("upstream_proxy_ignored", extra={"hint": "the /v1 relay supports http:// proxies only"})
            proxy = None
        self._client = HTTPClient(
            base_url,
            {"authorization": f"Bearer {api_key}", "content-type": "application/json"},
            timeout=settings.openai_timeout,
            connect_timeout=min(settings.openai_timeout, 10.0),
            proxy=proxy,
        )
        self._models: tuple[float, bytes] | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post(self, path: str, body: bytes, failed: list[Attempt], *, stream: bool) -> tuple[Response, Attempt]:
        """POST with retries; returns a successful response (streaming: headers only, body unread)."""
        attempts = 1 + self._settings.openai_max_retries
        for number in range(attempts):
            started_at, started = utcnow(), time.perf_counter()
            failure: UpstreamFailure | None = None
            status: int | None = None
            headers: Mapping[str, str] | None = None
            try:
                response = await self._client.request("POST", path, body)
                if response.status_code >= 400:
                    status, headers = response.status_code, response.headers
                    failure = UpstreamFailure(status, headers, await response.aread())
                elif not stream:
                    await response.aread()
            except TransportTimeout as exc:
                error: AppError = UpstreamTimeoutError("The upstream model did not answer in time.")
                cause: Exception = exc
            except TransportError as exc:
                error = UpstreamError("Could not reach the upstream model provider.", code="upstream_unreachable")
                cause = exc
            else:
                if failure is None:
                    attempt = Attempt(started_at, _elapsed_ms(started), response.status_code, clock=started)
                    attempt.request_id = response.headers.get("x-request-id")
                    return response, attempt
                error, cause = relayable(failure), failure
            request_id = headers.get("x-request-id") if headers else None
            failed.append(
                Attempt(started_at, _elapsed_ms(started), status or error.status_code, error.code, request_id)
            )
            delay = retry_delay(status, headers, number) if number + 1 < attempts else None
            if delay is None or delay > self._settings.openai_retry_max_wait:
                if failure is not None and failure.status_code not in (401, 403) and failure.status_code < 500:
                    raise failure
                raise error from cause
            log.warning("upstream_retry", extra={"attempt": number + 1, "delay_s": round(delay, 3), "status": status})
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def models(self) -> bytes:
        """The upstream's model list (cached for a minute)."""
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < MODELS_TTL_SECONDS:
            return self._models[1]
        try:
            response = await self._client.request("GET", "models")
            content = await response.aread()
        except TransportTimeout as exc:
            raise UpstreamTimeoutError("The upstream model did not answer in time.") from exc
        except TransportError as exc:
            raise UpstreamError("Could not reach the upstream model provider.", code="upstream_unreachable") from exc
        if response.status_code >= 400:
            raise relayable(UpstreamFailure(response.status_code, response.headers, content))
        self._models = (now, content)
        return content


def relayable(failure: UpstreamFailure) -> AppError:
    """The project's error for an upstream error status that is ours to own (auth, 5xx).

    Other 4xx answers (bad request, unknown model, rate limits) are the client's
    business and are relayed byte for byte instead.
    """
    if failure.status_code in (401, 403):
        return UpstreamError(
            "The upstream rejected this service's credentials; the operator must check OPENAI_API_KEY.",
            code="upstream_auth_failed",
        )
    if failure.status_code == 429:
        return RateLimitError(
            "The upstream is rate limiting requests.", headers={"retry-after": failure.headers.get("retry-after", "1")}
        )
    return UpstreamError(f"The upstream failed (HTTP {failure.status_code}).")


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def app_proxy(request: Request) -> Proxy | None:
    proxy: Proxy | None = request.app.state.proxy
    return proxy


ProxyDep = Annotated[Proxy | None, Depends(app_proxy)]
