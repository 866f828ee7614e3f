"""The drop-in `/v1/chat/completions`: relay the call, count it, optionally store it.

The request body goes upstream as the client wrote it, except for what the
service owns: `store` and its `metadata` (kept here, not at the provider), and
`stream_options.include_usage`, always asked for so every stream is counted;
the usage chunk then reaches the client only if it asked for it. Responses
come back byte for byte; a stream is relayed chunk by chunk as it arrives.
"""

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from app.core import streaming
from app.core.errors import AppError, InvalidRequestError, ServiceUnavailableError, UpstreamError
from app.core.logging import get_logger
from app.core.security import Principal
from app.db.database import SessionFactory
from app.services.http_client import Response
from app.services.limits import Limiter
from app.services.openai import Attempt, normalize_usage
from app.services.proxy import Proxy, UpstreamFailure
from app.services.stored import save_completion, validate_metadata
from app.services.usage import Accounting, CallContext, LedgerWriter

log = get_logger(__name__)

ENDPOINT = "v1.chat.completions"
RELAYED_HEADERS = (
    "openai-processing-ms",
    "openai-version",
    "openai-organization",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
)


@dataclass(slots=True)
class Relay:
    """What to send back: a status, headers, and a body or a stream of chunks."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None


@dataclass(slots=True)
class _Call:
    principal: Principal
    model: str
    messages: list[Any]
    payload: dict[str, Any]
    store: bool
    metadata: dict[str, str]
    wants_usage: bool
    context: CallContext
    failed: list[Attempt] = field(default_factory=list)


def _parse(raw: bytes, principal: Principal) -> tuple[_Call, bytes]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("We could not parse the JSON body of your request.") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise InvalidRequestError(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    messages = payload.get("messages")
    if messages is None:
        raise InvalidRequestError(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise InvalidRequestError(
            f"Invalid type for 'messages': expected an array, but got {_json_type(messages)} instead.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        raise InvalidRequestError(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    principal.check_model(model)

    changed = False
    store = payload.pop("store", None) is True
    changed |= store
    metadata: dict[str, str] = {}
    if store and "metadata" in payload:
        metadata = validate_metadata(payload.pop("metadata"))
    wants_usage = False
    if payload.get("stream") is True:
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequestError("'stream_options' must be an object.", param="stream_options")
        options = options or {}
        wants_usage = options.get("include_usage") is True
        if not wants_usage:
            payload["stream_options"] = {**options, "include_usage": True}
            changed = True
    context = CallContext(principal.user_id, principal.key_id, None, ENDPOINT)
    call = _Call(principal, model, messages, payload, store, metadata, wants_usage, context)
    return call, orjson.dumps(payload) if changed else raw


def _json_type(value: Any) -> str:
    """How OpenAI's error messages name a JSON value's type."""
    if isinstance(value, bool):
        return "boolean"
    kinds = ((str, "string"), (int, "integer"), (float, "number"), (dict, "object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "array")


def _headers(upstream: Any, started: float, upstream_ms: float) -> dict[str, str]:
    headers = {"content-type": upstream.get("content-type", "application/json")}
    if (request_id := upstream.get("x-request-id")) is not None:
        headers["x-upstream-request-id"] = request_id
    for name in RELAYED_HEADERS:
        if (value := upstream.get(name)) is not None:
            headers[name] = value
    overhead = (time.perf_counter() - started) * 1000 - upstream_ms
    headers["x-openai-service-overhead-ms"] = f"{max(overhead, 0.0):.3f}"
    return headers


class Gateway:
    """Relays `/v1/chat/completions` calls and accounts for them (one per app)."""

    def __init__(
        self,
        proxy: Proxy | None,
        accounting: Accounting,
        ledger: LedgerWriter,
        factory: SessionFactory,
        limiter: Limiter,
    ) -> None:
        self.proxy = proxy
        self.accounting = accounting
        self.ledger = ledger
        self.factory = factory
        self.limiter = limiter

    async def chat_completions(self, raw: bytes, principal: Principal, started: float) -> Relay:
        """Relay one chat completion (whole or streamed) and account for it."""
        call, body = _parse(raw, principal)
        if self.proxy is None:
            raise ServiceUnavailableError(
                "No model provider is configured. Set OPENAI_API_KEY (and OPENAI_BASE_URL) and restart the service.",
                code="upstream_not_configured",
            )
        await self.limiter.admit(principal)
        stream = call.payload.get("stream") is True
        upstream_started = time.perf_counter()
        try:
            response, attempt = await self.proxy.post("chat/completions", body, call.failed, stream=stream)
        except UpstreamFailure as failure:
            self.record(call, None, None, "", stream=stream)
            headers = _headers(failure.headers, started, (time.perf_counter() - upstream_started) * 1000)
            if failure.status_code != 429:
                headers["x-should-retry"] = "false"
            return Relay(failure.status_code, headers, failure.body)
        except AppError:
            self.record(call, None, None, "", stream=stream)
            raise
        upstream_ms = (time.perf_counter() - upstream_started) * 1000
        if stream:
            headers = _headers(response.headers, started, upstream_ms)
            return Relay(200, headers, chunks=await streaming.started(self._relay(response, call, attempt)))

        content = response.content
        try:
            completion = orjson.loads(content)
        except orjson.JSONDecodeError:
            completion = {}
        if not isinstance(completion, dict):
            completion = {}
        text = _first_content(completion)
        self.record(call, attempt, completion.get("usage"), text, stream=False, served=completion.get("model"))
        if call.store and "id" in completion:
            async with self.factory() as session:
                await save_completion(session, call.principal, call.payload, completion, call.metadata)
        return Relay(response.status_code, _headers(response.headers, started, upstream_ms), content)

    def record(
        self,
        call: _Call,
        attempt: Attempt | None,
        usage: dict[str, Any] | None,
        text: str,
        *,
        stream: bool,
        served: str | None = None,
    ) -> None:
        """Queue the call's ledger rows: its failed attempts, then the final one (if any)."""
        final = None
        if attempt is not None:
            model = served or call.model
            counted = normalize_usage(usage) if usage else self.accounting.estimate(model, call.messages, text)
            final = (attempt, model, counted)
        rows = self.accounting.rows(
            call.context, model_requested=call.model, failed=call.failed, stream=stream, final=final
        )
        for row in rows:
            self.ledger.add(row)

    async def _relay(self, response: Response, call: _Call, attempt: Attempt) -> AsyncGenerator[bytes]:
        """Pass events through as they arrive; count the stream however it ends.

        The events that arrive together (one read from the upstream) go out
        together, in one write. The stream is counted (and stored) before its
        last event goes out, so a client that has read `[DONE]` (or the error)
        already finds the call in its stats and its stored completions.
        """
        state = _StreamState()
        settle = _Settlement(self, call, attempt, state)
        try:
            yield b""  # started (app/core/streaming.py): from here on, the `finally` always runs
            while True:
                try:
                    piece = await anext(response)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # the upstream connection broke off
                    if not state.done:  # after [DONE] the reply is whole, however the connection ends
                        settle.error = UpstreamError(
                            "The upstream connection broke off in the middle of the reply.",
                            code="upstream_stream_broken",
                        )
                        log.warning("upstream_stream_broken", extra={"error": type(exc).__name__})
                    break
                out = state.take(piece, call.wants_usage, attempt)
                if state.done and not settle.settled:
                    await settle()
                if out:
                    yield out
            if settle.error is None and not state.done:
                settle.error = UpstreamError(
                    "The upstream ended the stream without [DONE].", code="upstream_stream_broken"
                )
            if settle.error is not None:
                attempt.status_code, attempt.error_code = settle.error.status_code, settle.error.code
                await settle()
                yield b"data: " + orjson.dumps(settle.error.body()) + b"\n\n"
        except BaseException:
            if not settle.settled:
                attempt.status_code, attempt.error_code = 499, "client_disconnected"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
                if not settle.settled:
                    await settle()


def _first_content(completion: dict[str, Any]) -> str:
    try:
        return str(completion["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return ""


@dataclass(slots=True)
class _Settlement:
    """Counts a relayed stream (and stores it, if asked and whole), once."""

    gateway: Gateway
    call: _Call
    attempt: Attempt
    state: "_StreamState"
    error: AppError | None = None
    settled: bool = False

    async def __call__(self) -> None:
        self.settled = True
        call, attempt, state = self.call, self.attempt, self.state
        attempt.latency_ms = round((time.perf_counter() - attempt.clock) * 1000, 3)
        text = "".join(state.content)
        self.gateway.record(call, attempt, state.usage, text, stream=True, served=state.model)
        if call.store and state.completion_id and state.done and self.error is None:
            async with self.gateway.factory() as session:
                await save_completion(session, call.principal, call.payload, state.completion(), call.metadata)


class _StreamState:
    """What a relayed stream has shown so far."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.completion_id: str | None = None
        self.created: int | None = None
        self.finish_reason: str | None = None
        self.done = False
        self._buffer = b""

    def take(self, piece: bytes, wants_usage: bool, attempt: Attempt) -> bytes:
        """What to relay of the next piece of the upstream's body: its whole events, as the client gets them."""
        buffer = self._buffer + piece
        out, start = [], 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            relayed = self.see(buffer[start : end + 2], wants_usage, attempt)
            start = end + 2
            if relayed is not None:
                out.append(relayed)
        self._buffer = buffer[start:]
        return b"".join(out)

    def see(self, event: bytes, wants_usage: bool, attempt: Attempt) -> bytes | None:
        """Note what an event says; return it as the client should get it (None: drop it)."""
        data = event.strip()
        if not data.startswith(b"data:"):
            return event
        data = data[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return event
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        self.completion_id = self.completion_id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        self.created = self.created or chunk.get("created")
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                if attempt.ttft_ms is None:
                    attempt.ttft_ms = round((time.perf_counter() - attempt.clock) * 1000, 3)
                self.content.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            if not wants_usage and not chunk.get("choices"):
                return None
        if not wants_usage and b'"usage":null' in event:
            return event.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
        return event

    def completion(self) -> dict[str, Any]:
        """The stream, assembled into the `chat.completion` it stands for."""
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created or int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.content), "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage,
        }
