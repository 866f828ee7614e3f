"""A local, deterministic test double of the OpenAI chat-completions HTTP API.

``FakeUpstream`` runs a small Starlette app under ``uvicorn.Server`` in a daemon
thread (with its own event loop) on ``127.0.0.1`` and a free port, so the real
service - or the official ``openai`` SDK - can use it as its upstream::

    with FakeUpstream() as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key)
        ...

Protocol
--------
* Every request must carry ``Authorization: Bearer <api_key>``; otherwise the
  answer is 401 with OpenAI's ``invalid_api_key`` error body.  Requests
  rejected this way are recorded but consume no fault and no queued reply.
* Every response carries an ``x-request-id: req_<hex>`` header (and
  ``openai-version``), error bodies are always OpenAI-shaped:
  ``{"error": {"message", "type", "param", "code"}}``, also for unknown paths.
* ``GET /v1/models`` and ``GET /v1/models/{model}`` list / describe the
  configured model ids (404 ``model_not_found`` for unknown ones).
* ``POST /v1/chat/completions`` validates the body minimally (``model`` and a
  non-empty ``messages`` list are required; an unknown model gives 404
  ``model_not_found``), then answers with a ``chat.completion`` object or,
  with ``"stream": true``, a ``text/event-stream`` of ``chat.completion.chunk``
  objects: a first chunk with ``delta: {"role": "assistant", "content": ""}``,
  one chunk per word of the reply (the word with its preceding whitespace, so
  a single space for all but the first word of a normally spaced text), a
  chunk with an empty delta and the ``finish_reason``, then - only if
  ``stream_options.include_usage`` is true - a chunk with ``choices: []`` and
  the usage (the earlier chunks then carry ``"usage": null``, as OpenAI's do),
  and finally ``data: [DONE]``.  Concatenating the content deltas gives
  exactly the non-streamed ``message.content`` (for a reply with at least one
  word).

Reply text
----------
By default the reply is ``"Echo: " + <text of the last user message>`` (a
message whose content is a list of parts has the ``text`` of its ``"text"``
parts joined with single spaces; no user message means an empty text).
``queue_reply()`` overrides the text of the next completions, FIFO.  If
``max_completion_tokens`` (or else ``max_tokens``) is given and the reply has
more words than that, it is cut right after that many words and
``finish_reason`` is ``"length"``; otherwise it is ``"stop"``.

Token counting
--------------
As OpenAI counts: with the model's tiktoken encoding (the project's own
``app.services.tokens.Tokenizer``, whose tables are checked against known
counts in ``tests/test_tokens.py``).

* ``prompt_tokens`` = the chat-format count of ``messages`` (3 per message,
  its fields, 3 priming the reply);
* ``completion_tokens`` = tokens of the reply text sent + ``reasoning_tokens``;
* ``total_tokens = prompt_tokens + completion_tokens``;
* ``prompt_tokens_details.cached_tokens = fake.cached_tokens`` (default 0) and
  ``completion_tokens_details.reasoning_tokens = fake.reasoning_tokens``
  (default 0); the audio and prediction counts are always 0.

Fault injection
---------------
``fail_next``, ``hang_next``, ``cut_stream_next`` and ``omit_usage_next`` push
faults onto one FIFO queue; each request to ``/v1/chat/completions`` that
passes authentication pops exactly one fault, if any.  ``cut_stream_next`` and
``omit_usage_next`` only have an effect on streaming requests (a
non-streaming request that pops one is answered normally).  A hung request
whose client disconnects during the hang is not answered and not counted.
``slow_stream`` is a persistent setting (until ``reset()``).

Recording
---------
``fake.requests`` lists every request received (authorised or not, valid or
not) as a ``RecordedRequest``; ``fake.totals`` sums the usage of the chat
completions actually produced: a cut or disconnected stream counts as a
request, with its prompt tokens and the reasoning tokens plus the words
actually sent as completion tokens.  A request rejected by a fault or by
validation is not counted in ``totals``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from app.services.tokens import Tokenizer

__all__ = [
    "DEFAULT_MODELS",
    "FakeUpstream",
    "RecordedRequest",
    "Totals",
    "message_text",
]

DEFAULT_MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o3-mini")
MODEL_CREATED = 1_700_000_000
MODEL_OWNER = "system"
SYSTEM_FINGERPRINT = "fp_fake"
_WORD = re.compile(r"\S+")
_POLL_SECONDS = 0.05
_KEY_HINT = "You can find your API key at https://platform.openai.com/account/api-keys."
_MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). "
    "You can obtain an API key from https://platform.openai.com/account/api-keys."
)

_DEFAULT_ERRORS: dict[int, tuple[str, str | None, str]] = {
    # status: (type, code, message)
    400: ("invalid_request_error", None, "Bad request (injected by FakeUpstream)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. " + _KEY_HINT,
    ),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", None, "Not found (injected by FakeUpstream)."),
    409: ("invalid_request_error", None, "Conflict (injected by FakeUpstream)."),
    422: (
        "invalid_request_error",
        None,
        "Unprocessable entity (injected by FakeUpstream).",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        (
            "Rate limit reached for requests in organization org-fake on requests per "
            "min (RPM): Limit 3, Used 3, Requested 1. Please try again later."
        ),
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: (
        "server_error",
        "service_unavailable",
        "The server is overloaded or not ready yet.",
    ),
    504: ("server_error", None, "Gateway timeout."),
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as received by the fake."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: Any  # parsed JSON, or None when the body is empty or not JSON
    request_id: str
    raw_body: bytes = b""


@dataclass(frozen=True)
class Totals:
    """Usage summed over the chat completions the fake produced."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class _Fault:
    kind: Literal["fail", "hang", "cut", "omit_usage"]
    status: int = 0
    retry_after: str | None = None
    message: str | None = None
    code: str | None = None
    error_type: str | None = None
    seconds: float = 0.0
    after_chunks: int = 0


@dataclass
class _Completion:
    """Everything needed to render one chat completion."""

    completion_id: str
    created: int
    model: str
    pieces: list[str]  # one entry per word (with its leading whitespace)
    content: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    count: Callable[[str], int]
    include_usage: bool = False
    words_sent: int = field(default=0)

    def text_tokens(self, words: int) -> int:
        """Tokens of the first `words` pieces of the reply, as OpenAI would count them."""
        return self.count("".join(self.pieces[:words]))

    def usage(self, words: int) -> dict[str, Any]:
        completion_tokens = self.text_tokens(words) + self.reasoning_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


class _StreamCut(Exception):
    """Raised inside a streaming body to make uvicorn drop the connection."""


class _ApiError(Exception):
    """An OpenAI-shaped error to be turned into a response."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }
        return _json_response(body, self.status, self.headers)


# --------------------------------------------------------------------------- helpers


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _words(text: str) -> int:
    return len(text.split())


def message_text(message: Any) -> str:
    """Text content of a message: the string, or its text parts joined with spaces."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return ""


def _split_reply(text: str, limit: int | None) -> tuple[list[str], str, str]:
    """Split the reply into stream pieces; return (pieces, content, finish_reason)."""
    matches = list(_WORD.finditer(text))
    finish_reason = "stop"
    content = text
    if limit is not None and len(matches) > limit:
        matches = matches[:limit]
        content = text[: matches[-1].end()] if matches else ""
        finish_reason = "length"
    pieces: list[str] = []
    start = 0
    for match in matches:
        pieces.append(text[start : match.end()])
        start = match.end()
    if pieces and finish_reason == "stop":
        pieces[-1] += text[start:]  # trailing whitespace, so pieces join to content
    return pieces, content, finish_reason


def _mask_key(key: str) -> str:
    return f"{key[:3]}{'*' * max(len(key) - 7, 3)}{key[-4:]}" if len(key) > 8 else "***"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number" if isinstance(value, float) else "integer"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _ApiError(
            400,
            f"Invalid type for '{name}': expected an integer, but got {_type_name(value)} instead.",
            param=name,
            code="invalid_type",
        )
    if value < 1:
        raise _ApiError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    return value


# --------------------------------------------------------------------------- the fake


class FakeUpstream:
    """Fake OpenAI API on loopback.  Thread-safe; see the module docstring."""

    def __init__(
        self,
        api_key: str = "sk-test-upstream",
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        startup_timeout: float = 10.0,
    ) -> None:
        self._api_key = api_key
        self._models: tuple[str, ...] = tuple(models)
        self._startup_timeout = startup_timeout
        self._lock = threading.Lock()
        # Tokens are counted as OpenAI counts them, with the project's tiktoken tables.
        self._tokenizer = Tokenizer()
        self._stopping = threading.Event()
        self._faults: deque[_Fault] = deque()
        self._replies: deque[str] = deque()
        self._records: list[RecordedRequest] = []
        self._totals = Totals()
        self._cached_tokens = 0
        self._reasoning_tokens = 0
        self._stream_delay = 0.0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._app = Starlette(
            routes=[
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._get_model, methods=["GET"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start serving; returns once the server accepts connections."""
        if self._server is not None:
            raise RuntimeError("FakeUpstream can only be started once")
        self._tokenizer.preload()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._asgi,
            loop="asyncio",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        logging.getLogger("uvicorn.error").addFilter(self._drop_stream_cut_logs)
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"fake-upstream-{self._port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError("FakeUpstream failed to start")
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the server and wait for its thread (idempotent)."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        logging.getLogger("uvicorn.error").removeFilter(self._drop_stream_cut_logs)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ configuration

    @property
    def base_url(self) -> str:
        """E.g. ``http://127.0.0.1:PORT/v1`` (what the SDK's ``base_url`` expects)."""
        if self._port is None:
            raise RuntimeError("FakeUpstream is not started")
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def api_key(self) -> str:
        return self._api_key

    @property
    def models(self) -> tuple[str, ...]:
        return self._models

    @property
    def cached_tokens(self) -> int:
        with self._lock:
            return self._cached_tokens

    @cached_tokens.setter
    def cached_tokens(self, value: int) -> None:
        with self._lock:
            self._cached_tokens = value

    @property
    def reasoning_tokens(self) -> int:
        with self._lock:
            return self._reasoning_tokens

    @reasoning_tokens.setter
    def reasoning_tokens(self, value: int) -> None:
        with self._lock:
            self._reasoning_tokens = value

    def slow_stream(self, delay_seconds: float) -> None:
        """Sleep before each content chunk of every stream (until ``reset()``)."""
        with self._lock:
            self._stream_delay = delay_seconds

    def queue_reply(self, *texts: str) -> None:
        """Use these texts, in order, as the replies of the next chat completions."""
        with self._lock:
            self._replies.extend(texts)

    def fail_next(
        self,
        status: int,
        times: int = 1,
        retry_after: float | str | None = None,
        message: str | None = None,
        code: str | None = None,
        *,
        error_type: str | None = None,
    ) -> None:
        """Answer the next ``times`` chat completions with an OpenAI-shaped error."""
        header = None
        if retry_after is not None:
            header = (
                str(int(retry_after))
                if isinstance(retry_after, float) and retry_after.is_integer()
                else str(retry_after)
            )
        fault = _Fault(
            "fail",
            status=status,
            retry_after=header,
            message=message,
            code=code,
            error_type=error_type,
        )
        self._push_faults(fault, times)

    def hang_next(self, seconds: float, times: int = 1) -> None:
        """Delay the next ``times`` chat completions (without blocking others)."""
        self._push_faults(_Fault("hang", seconds=seconds), times)

    def cut_stream_next(self, after_chunks: int) -> None:
        """Abort the next stream after ``after_chunks`` content chunks (no [DONE])."""
        self._push_faults(_Fault("cut", after_chunks=after_chunks), 1)

    def omit_usage_next(self) -> None:
        """The next stream sends no usage chunk even if ``include_usage`` was asked."""
        self._push_faults(_Fault("omit_usage"), 1)

    def reset(self) -> None:
        """Forget faults, queued replies, records, totals and settings."""
        with self._lock:
            self._faults.clear()
            self._replies.clear()
            self._records.clear()
            self._totals = Totals()
            self._cached_tokens = 0
            self._reasoning_tokens = 0
            self._stream_delay = 0.0

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the list of every request received, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def totals(self) -> Totals:
        """A snapshot of the usage counters."""
        with self._lock:
            return self._totals

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    # -------------------------------------------------------------- internals: state

    def _push_faults(self, fault: _Fault, times: int) -> None:
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.extend([fault] * times)

    def _pop_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _next_reply(self, default: str) -> str:
        with self._lock:
            return self._replies.popleft() if self._replies else default

    def _account(self, completion: _Completion, words: int) -> None:
        with self._lock:
            t = self._totals
            self._totals = Totals(
                requests=t.requests + 1,
                prompt_tokens=t.prompt_tokens + completion.prompt_tokens,
                completion_tokens=t.completion_tokens + completion.text_tokens(words) + completion.reasoning_tokens,
                cached_tokens=t.cached_tokens + completion.cached_tokens,
                reasoning_tokens=t.reasoning_tokens + completion.reasoning_tokens,
            )

    def _drop_stream_cut_logs(self, record: logging.LogRecord) -> bool:
        """Logging filter: hide uvicorn's traceback for deliberately cut streams."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BaseExceptionGroup):
            _, rest = exc.split(_StreamCut)
            return rest is not None
        return not isinstance(exc, _StreamCut)

    async def _pause(self, seconds: float, request: Request | None = None) -> bool:
        """Sleep up to ``seconds``; False if cut short (stopping, client gone)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping.is_set() or (request is not None and await request.is_disconnected()):
                return False
            await asyncio.sleep(min(remaining, _POLL_SECONDS))
        return True

    # ------------------------------------------------------------------ internals: ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Outer ASGI layer: record, add ``x-request-id``, check auth, then route."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key, val = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        try:
            parsed: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        request_id = f"req_{uuid.uuid4().hex}"
        record = RecordedRequest(scope["method"], scope["path"], headers, parsed, request_id, raw)
        with self._lock:
            self._records.append(record)

        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-request-id", request_id.encode()),
                    (b"openai-version", b"2020-10-01"),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        authorization = headers.get("authorization")
        if authorization != f"Bearer {self._api_key}":
            if authorization is None:
                error_message = _MISSING_KEY_MESSAGE
            else:
                supplied = _mask_key(authorization.removeprefix("Bearer ").strip())
                error_message = f"Incorrect API key provided: {supplied}. {_KEY_HINT}"
            error = _ApiError(401, error_message, code="invalid_api_key")
            await error.response()(scope, replay_receive, send_with_id)
            return
        await self._app(scope, replay_receive, send_with_id)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = f"Invalid URL ({request.method} {request.url.path})"
        if status == 405:
            message = f"Method not allowed ({request.method} {request.url.path})"
        return _ApiError(status, message).response()

    async def _list_models(self, request: Request) -> Response:
        return _json_response({"object": "list", "data": [self._model_object(m) for m in self._models]})

    async def _get_model(self, request: Request) -> Response:
        model = str(request.path_params["model"])
        if model not in self._models:
            return self._model_not_found(model, param="model").response()
        return _json_response(self._model_object(model))

    @staticmethod
    def _model_object(model: str) -> dict[str, Any]:
        return {
            "id": model,
            "object": "model",
            "created": MODEL_CREATED,
            "owned_by": MODEL_OWNER,
        }

    @staticmethod
    def _model_not_found(model: str, param: str | None = None) -> _ApiError:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _ApiError(404, message, param=param, code="model_not_found")

    async def _chat_completions(self, request: Request) -> Response:
        # Read the body first: ``request.is_disconnected()`` (used while hanging)
        # consumes ASGI messages, the body included, if it is still unread.
        raw = await request.body()
        fault = self._pop_fault()
        if (
            fault is not None
            and fault.kind == "hang"
            and not await self._pause(fault.seconds, request)
            and await request.is_disconnected()
        ):
            return Response(status_code=499)  # the client is gone: answer nobody
        if fault is not None and fault.kind == "fail":
            return self._injected_error(fault).response()
        try:
            body = self._validate(raw)
        except _ApiError as error:
            return error.response()

        messages: list[Any] = body["messages"]
        last_user = next(
            (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
            None,
        )
        text = self._next_reply("Echo: " + message_text(last_user))
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        pieces, content, finish_reason = _split_reply(text, limit)
        with self._lock:
            cached, reasoning = self._cached_tokens, self._reasoning_tokens
        completion = _Completion(
            completion_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body["model"],
            pieces=pieces,
            content=content,
            finish_reason=finish_reason,
            prompt_tokens=self._tokenizer.count_messages(messages, body["model"]).tokens,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            count=lambda text: self._tokenizer.count_text(text, body["model"]).tokens,
        )
        if body.get("stream") is not True:
            self._account(completion, len(pieces))
            return _json_response(self._completion_object(completion))

        stream_options = body.get("stream_options") or {}
        completion.include_usage = bool(stream_options.get("include_usage"))
        send_usage = completion.include_usage and not (fault is not None and fault.kind == "omit_usage")
        cut_after = fault.after_chunks if fault is not None and fault.kind == "cut" else None
        return StreamingResponse(
            self._stream(completion, send_usage, cut_after),
            media_type="text/event-stream; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )

    def _validate(self, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise _ApiError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely "
                "means you aren't using your HTTP library correctly. The OpenAI API "
                "expects a JSON payload, but what was sent was not valid JSON.)",
            )
        model = body.get("model")
        if model is None:
            raise _ApiError(400, "you must provide a model parameter")
        if not isinstance(model, str):
            raise _ApiError(
                400,
                f"Invalid type for 'model': expected a string, but got {_type_name(model)} instead.",
                param="model",
                code="invalid_type",
            )
        messages = body.get("messages")
        if messages is None:
            raise _ApiError(
                400,
                "Missing required parameter: 'messages'.",
                param="messages",
                code="missing_required_parameter",
            )
        if not isinstance(messages, list):
            raise _ApiError(
                400,
                f"Invalid type for 'messages': expected an array, but got {_type_name(messages)} instead.",
                param="messages",
                code="invalid_type",
            )
        if not messages:
            raise _ApiError(
                400,
                "Invalid 'messages': empty array. Expected an array with minimum "
                "length 1, but got an empty array instead.",
                param="messages",
                code="empty_array",
            )
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _ApiError(
                    400,
                    f"Invalid type for 'messages[{index}]': expected an object, but got {_type_name(message)} instead.",
                    param=f"messages[{index}]",
                    code="invalid_type",
                )
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise _ApiError(
                400,
                f"Invalid type for 'stream_options': expected an object, but got {_type_name(stream_options)} instead.",
                param="stream_options",
                code="invalid_type",
            )
        _positive_int(body, "max_tokens")
        _positive_int(body, "max_completion_tokens")
        if stream_options is not None and body.get("stream") is not True:
            raise _ApiError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        if model not in self._models:
            raise self._model_not_found(model)
        return body

    @staticmethod
    def _injected_error(fault: _Fault) -> _ApiError:
        error_type, code, message = _DEFAULT_ERRORS.get(
            fault.status,
            (
                "server_error" if fault.status >= 500 else "invalid_request_error",
                None,
                "Injected error.",
            ),
        )
        headers = {"retry-after": fault.retry_after} if fault.retry_after is not None else None
        return _ApiError(
            fault.status,
            fault.message if fault.message is not None else message,
            error_type=fault.error_type if fault.error_type is not None else error_type,
            code=fault.code if fault.code is not None else code,
            headers=headers,
        )

    @staticmethod
    def _completion_object(c: _Completion) -> dict[str, Any]:
        return {
            "id": c.completion_id,
            "object": "chat.completion",
            "created": c.created,
            "model": c.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": c.content,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            ],
            "usage": c.usage(len(c.pieces)),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    @staticmethod
    def _chunk(c: _Completion, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": c.completion_id,
            "object": "chat.completion.chunk",
            "created": c.created,
            "model": c.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if c.include_usage:
            chunk["usage"] = None
        return chunk

    async def _stream(self, c: _Completion, send_usage: bool, cut_after: int | None) -> AsyncIterator[bytes]:
        """The SSE body.  Accounts for what was sent when it ends, however it ends."""
        try:
            yield _sse(self._chunk(c, {"role": "assistant", "content": ""}, None))
            for piece in c.pieces:
                if cut_after is not None and c.words_sent >= cut_after:
                    break
                with self._lock:
                    delay = self._stream_delay
                if delay > 0:
                    await self._pause(delay)
                c.words_sent += 1
                yield _sse(self._chunk(c, {"content": piece}, None))
            if cut_after is not None:
                raise _StreamCut(f"stream cut after {c.words_sent} content chunks")
            yield _sse(self._chunk(c, {}, c.finish_reason))
            if send_usage:
                usage_chunk = {
                    **self._chunk(c, {}, None),
                    "choices": [],
                    "usage": c.usage(c.words_sent),
                }
                yield _sse(usage_chunk)
            yield b"data: [DONE]\n\n"
        finally:
            self._account(c, c.words_sent)
