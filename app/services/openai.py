"""The upstream model provider: the only module that imports the `openai` SDK.

One long-lived `AsyncOpenAI` client per process. The SDK's own retries are off
(`max_retries=0`) and this module retries instead, so a request makes at most
`1 + OPENAI_MAX_RETRIES` (<= 3) upstream attempts in all, waits what the
upstream's `retry-after` asks (up to `OPENAI_RETRY_MAX_WAIT`), and never
retries a stream once its first chunk has arrived. SDK errors become the
project's own errors here; upstream credentials problems are our 502, never
our 401.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, TypeVar, cast

import httpx2
import openai
from fastapi import Depends, Request
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from app.core.config import Settings
from app.core.errors import (
    AppError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
)
from app.core.logging import get_logger
from app.db.models import utcnow
from app.services.retries import retry_delay

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Attempt:
    """One upstream call, as the usage ledger records it."""

    started_at: datetime
    latency_ms: float
    status_code: int
    error_code: str | None = None
    request_id: str | None = None
    ttft_ms: float | None = None
    clock: float = field(default=0.0, repr=False)  # perf_counter() at the start


@dataclass(slots=True)
class Completion:
    """A whole reply."""

    content: str
    model: str
    finish_reason: str | None
    usage: dict[str, Any] | None
    attempt: Attempt


@dataclass(slots=True)
class ReplyStream:
    """A reply arriving in pieces; `usage` and friends are filled in as the stream ends."""

    _stream: AsyncStream[ChatCompletionChunk]
    model: str
    attempt: Attempt
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    content: list[str] = field(default_factory=list)

    def finish(self) -> Attempt:
        """The attempt's timing, measured up to now (call when the stream has ended)."""
        self.attempt.latency_ms = _elapsed_ms(self.attempt.clock)
        return self.attempt

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text as it arrives; a broken stream raises an `UpstreamError`."""
        try:
            async for chunk in self._stream:
                if chunk.model:
                    self.model = chunk.model
                if chunk.usage is not None:
                    self.usage = normalize_usage(chunk.usage.model_dump())
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.finish_reason:
                        self.finish_reason = choice.finish_reason
                    text = choice.delta.content
                    if text:
                        if self.attempt.ttft_ms is None:
                            self.attempt.ttft_ms = _elapsed_ms(self.attempt.clock)
                        self.content.append(text)
                        yield text
        except openai.APITimeoutError as exc:
            raise map_error(exc) from exc
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            raise UpstreamError(
                "The upstream connection broke off in the middle of the reply.", code="upstream_stream_broken"
            ) from exc
        except openai.APIError as exc:
            raise map_error(exc) from exc

    async def aclose(self) -> None:
        await self._stream.close()


def normalize_usage(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Usage in OpenAI's chat names, with the cached and reasoning details always present."""
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(raw.get("total_tokens") or prompt + completion),
        "prompt_tokens_details": {"cached_tokens": int(prompt_details.get("cached_tokens") or 0)},
        "completion_tokens_details": {"reasoning_tokens": int(completion_details.get("reasoning_tokens") or 0)},
    }


def _error_body(exc: openai.APIStatusError) -> tuple[str, str | None, str | None]:
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") if isinstance(body.get("message"), str) else None
    return message or f"The upstream answered HTTP {exc.status_code}.", exc.param, exc.code


def map_error(exc: openai.APIError) -> AppError:
    """Turn an SDK error into the project's own error."""
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamTimeoutError("The upstream model did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError("Could not reach the upstream model provider.", code="upstream_unreachable")
    if not isinstance(exc, openai.APIStatusError):
        return UpstreamError(f"The upstream sent an error: {exc.message}")
    message, param, code = _error_body(exc)
    status = exc.status_code
    if status in (401, 403):
        return UpstreamError(
            "The upstream rejected this service's credentials; the operator must check OPENAI_API_KEY.",
            code="upstream_auth_failed",
        )
    if status == 429:
        retry_after = exc.response.headers.get("retry-after")
        return RateLimitError(
            f"The upstream is rate limiting requests: {message}",
            code=code or "rate_limit_exceeded",
            headers={"retry-after": retry_after or "1"},
        )
    if status == 404:
        return NotFoundError(message, param=param or "model", code=code or "model_not_found")
    if 400 <= status < 500:
        return InvalidRequestError(message, param=param, code=code or "upstream_invalid_request")
    return UpstreamError(f"The upstream failed (HTTP {status}): {message}")


def _retry_delay(exc: openai.APIError, attempt: int) -> float | None:
    """Seconds to wait before the next attempt, or None when a retry cannot help."""
    if isinstance(exc, openai.APIStatusError):
        return retry_delay(exc.status_code, exc.response.headers, attempt)
    return retry_delay(None, None, attempt) if isinstance(exc, openai.APIConnectionError) else None


class Upstream:
    """The model provider behind the service."""

    def __init__(self, settings: Settings, *, base_url: str, api_key: str) -> None:
        self._settings = settings
        self._base_url = base_url
        self._client = AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=httpx2.Timeout(settings.openai_timeout, connect=min(settings.openai_timeout, 10.0)),
            max_retries=0,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> "Upstream | None":
        """The provider configured by OPENAI_API_KEY and OPENAI_BASE_URL; None without a key."""
        if not settings.openai_api_key:
            return None
        return cls(settings, base_url=settings.openai_base_url, api_key=settings.openai_api_key.get_secret_value())

    @property
    def base_url(self) -> str:
        """Where requests go (the OpenAI-compatible `.../v1` URL)."""
        return self._base_url

    async def aclose(self) -> None:
        await self._client.close()

    async def _with_retries(self, call: Callable[[], Awaitable[T]], failed: list[Attempt]) -> tuple[T, Attempt]:
        """Make the call, retrying what can be retried; every failed attempt is appended to `failed`."""
        attempts = 1 + self._settings.openai_max_retries
        for attempt in range(attempts):
            started_at, started = utcnow(), time.perf_counter()
            try:
                result = await call()
            except openai.APIError as exc:
                error = map_error(exc)
                status = exc.status_code if isinstance(exc, openai.APIStatusError) else error.status_code
                request_id = exc.request_id if isinstance(exc, openai.APIStatusError) else None
                failed.append(Attempt(started_at, _elapsed_ms(started), status, error.code, request_id))
                delay = _retry_delay(exc, attempt) if attempt + 1 < attempts else None
                if delay is None or delay > self._settings.openai_retry_max_wait:
                    raise error from exc
                log.warning(
                    "upstream_retry",
                    extra={"attempt": attempt + 1, "delay_s": round(delay, 3), "status": status},
                )
                await asyncio.sleep(delay)
            else:
                return result, Attempt(started_at, _elapsed_ms(started), 200, clock=started)
        raise AssertionError("unreachable")

    async def complete(
        self, model: str, messages: list[dict[str, Any]], params: dict[str, Any], failed: list[Attempt]
    ) -> Completion:
        """Ask for a whole reply."""

        async def call() -> ChatCompletion:
            return await self._client.chat.completions.create(
                model=model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                stream=False,
                extra_body=params,
            )

        result, attempt = await self._with_retries(call, failed)
        attempt.request_id = result._request_id
        choice = result.choices[0] if result.choices else None
        return Completion(
            content=(choice.message.content or "") if choice else "",
            model=result.model or model,
            finish_reason=choice.finish_reason if choice else None,
            usage=normalize_usage(result.usage.model_dump()) if result.usage else None,
            attempt=attempt,
        )

    async def stream(
        self, model: str, messages: list[dict[str, Any]], params: dict[str, Any], failed: list[Attempt]
    ) -> ReplyStream:
        """Open a streamed reply, always asking the upstream to report usage at the end."""

        async def call() -> AsyncStream[ChatCompletionChunk]:
            return await self._client.chat.completions.create(
                model=model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                stream=True,
                stream_options={"include_usage": True},
                extra_body=params,
            )

        stream, attempt = await self._with_retries(call, failed)
        attempt.request_id = stream.response.headers.get("x-request-id")
        return ReplyStream(stream, model=model, attempt=attempt)


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def app_upstream(request: Request) -> Upstream | None:
    """The app's upstream; None when no provider is configured."""
    upstream: Upstream | None = request.app.state.upstream
    return upstream


UpstreamDep = Annotated[Upstream | None, Depends(app_upstream)]
