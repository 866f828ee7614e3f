"""The embedded local model, served as an OpenAI-compatible HTTP API on loopback.

The service runs this as a child process (`app.services.local_model` starts and stops it);
the service itself never imports it, nor `llama_cpp`:

    python -m app.services.local_model_server --model PATH --name NAME [--port P] ...

Start-up handshake: the parent writes the bearer key as the first line of stdin and keeps
stdin open; end of file on stdin means the parent is gone, and the server exits (on Linux,
PR_SET_PDEATHSIG does the same even if the pipe is inherited somewhere). Once the model is
loaded and the port bound, the port is printed as one line on stdout, and nothing else is
ever written there.

`GET /v1/models`, `GET /v1/models/{model}` and `POST /v1/chat/completions` (JSON, or SSE
chunks, a usage chunk when `stream_options.include_usage` is true, then `data: [DONE]`),
with errors in OpenAI's shape. One worker thread owns the model and runs one generation at
a time; requests queue for it. Each is bounded by `--max-tokens` (a larger request is cut
to it) and by `--timeout` seconds from its arrival (a reply cut by the timeout ends with
finish_reason "length"; a request still queued then gets a 503). Usage is exact: the
prompt and generated tokens are counted as the model sees them, streamed or not.
"""

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import orjson
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger("openai_service.local_model_server")

_PR_SET_PDEATHSIG = 1
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True, slots=True)
class Options:
    """What the server runs and how far it lets a request go."""

    model_path: Path
    name: str
    aliases: tuple[str, ...] = ()
    threads: int = 2
    context: int = 2048
    max_tokens: int = 256
    timeout: float = 120.0


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The error as OpenAI renders it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        """The error as an HTTP response."""
        return _json(self.body(), self.status)


# Requests: the subset of OpenAI's chat parameters a local model can honour; the others
# (tools, logprobs, reasoning_effort, ...) are accepted and ignored, as vLLM and llama.cpp do.


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text; a list of parts must be text parts only."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" for part in self.content):
            raise ApiError(400, "The local model reads text only.", param="messages", code="unsupported_content")
        return "\n".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1

    def sampling(self) -> dict[str, Any]:
        """The sampling arguments for llama-cpp, only those the request sets."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > 4:
            raise ApiError(400, "stop takes at most 4 sequences.", param="stop")
        if self.n != 1:
            raise ApiError(400, "The local model returns one choice: n must be 1.", param="n")
        values = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "stop": stop,
            "seed": self.seed,
        }
        return {key: value for key, value in values.items() if value is not None}


# What the worker thread sends back for a job, in order: deltas, then one end.


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    error: ApiError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One generation, queued for the worker; its events come back on `events`."""

    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    max_tokens: int
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Event) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(slots=True)
class TokenCount:
    """Tokens of the current generation, counted as the model evaluates and samples them."""

    prompt: int = 0
    sampled: int = 0
    last_is_end: bool = False

    @property
    def completion(self) -> int:
        """Generated tokens, as llama-cpp's own usage counts them (the end-of-generation token is not one)."""
        return self.sampled - int(self.last_is_end)


def load_model(options: Options, count: TokenCount) -> "Llama":
    """Load the GGUF file; the model reports every prompt and sampled token to `count`."""
    # llama.cpp's OpenMP threads spin while they wait for each other: on cores shared with
    # other work (the service itself, for one) that made generation ten times slower, here.
    # Set before the library loads, which reads it once.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp  # noqa: PLC0415 (heavy: loaded only in this process, and only here)

    class CountingLlama(llama_cpp.Llama):
        def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
            count.prompt, count.sampled, count.last_is_end = len(tokens), 0, False
            vocab = llama_cpp.llama_model_get_vocab(self.model)
            for token in super().generate(tokens, *args, **kwargs):
                count.sampled += 1
                count.last_is_end = bool(llama_cpp.llama_vocab_is_eog(vocab, token))
                yield token

    return CountingLlama(
        model_path=str(options.model_path),
        n_ctx=options.context,
        n_threads=options.threads,
        n_threads_batch=options.threads,
        verbose=False,
    )


class ModelWorker:
    """The one thread that runs the model: jobs are served one at a time, in arrival order."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._count = TokenCount()
        self._llama: Llama | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="local-model", daemon=True)

    def load(self) -> float:
        """Load the model; returns the seconds it took."""
        started = time.perf_counter()
        self._llama = load_model(self.options, self._count)
        return time.perf_counter() - started

    def start(self) -> None:
        """Start serving jobs."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the job in progress; queued jobs are not served."""
        self._jobs.put(None)

    def submit(self, job: Job) -> None:
        """Queue a job."""
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            if time.monotonic() >= job.deadline:
                job.emit(Failed(_busy_error(self.options.timeout)))
                continue
            job.emit(self._generate(job))

    def _generate(self, job: Job) -> Finished | Failed:
        assert self._llama is not None
        finish_reason = "stop"
        try:
            chunks = cast(
                Iterator[Any],
                self._llama.create_chat_completion(
                    messages=job.messages,  # type: ignore[arg-type]
                    max_tokens=job.max_tokens,
                    stream=True,
                    **job.sampling,
                ),
            )
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content")
                    if text:
                        job.emit(Delta(text))
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    if job.cancelled.is_set():
                        break
                    if time.monotonic() >= job.deadline and not choice.get("finish_reason"):
                        finish_reason = "length"
                        log.warning("local_model_timeout", extra={"after_s": self.options.timeout})
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except ValueError as exc:
            if "exceed context window" in str(exc):
                return Failed(
                    ApiError(
                        400,
                        f"This model's context is {self.options.context} tokens, and the messages do not fit "
                        "in it. Send fewer or shorter messages (or raise LOCAL_MODEL_CONTEXT).",
                        param="messages",
                        code="context_length_exceeded",
                    )
                )
            log.exception("local_model_failed")
            return Failed(ApiError(500, "The local model failed.", type="server_error"))
        except Exception:
            # The worker must outlive a failed generation: report it and serve the next job.
            log.exception("local_model_failed")
            return Failed(ApiError(500, "The local model failed.", type="server_error"))
        return Finished(finish_reason, self._count.prompt, self._count.completion)


def _busy_error(timeout: float) -> ApiError:
    return ApiError(
        503,
        f"The local model is busy: this request waited {timeout:g} s for its turn. Retry later.",
        type="server_error",
        code="model_busy",
    )


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers={"x-request-id": "req_" + secrets.token_hex(12), **(headers or {})},
    )


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class LocalModelApp:
    """The HTTP side: authentication, validation, and the OpenAI wire format."""

    def __init__(self, worker: ModelWorker, api_key: str) -> None:
        self.worker = worker
        self.options = worker.options
        self._api_key = api_key.encode()
        self._names = {name.lower() for name in (self.options.name, *self.options.aliases)}
        self._created = int(self.options.model_path.stat().st_mtime)

    def asgi(self) -> Starlette:
        """The Starlette application."""

        async def on_http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            code = "unknown_url" if status == 404 else None
            return ApiError(status, f"Unknown request: {request.method} {request.url.path}", code=code).response()

        return Starlette(
            routes=[
                Route("/v1/models", self._guard(self.list_models), methods=["GET"]),
                Route("/v1/models/{model:path}", self._guard(self.get_model), methods=["GET"]),
                Route("/v1/chat/completions", self._guard(self.chat_completions), methods=["POST"]),
            ],
            exception_handlers={HTTPException: on_http_error},
        )

    def _guard(self, endpoint: Any) -> Any:
        async def guarded(request: Request) -> Response:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self._api_key):
                return ApiError(401, "Incorrect API key provided.", code="invalid_api_key").response()
            try:
                response: Response = await endpoint(request)
            except ApiError as exc:
                return exc.response()
            return response

        return guarded

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.options.name, "object": "model", "created": self._created, "owned_by": "local"}

    def _check_model(self, model: str) -> None:
        if model.strip().lower() not in self._names:
            raise ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it. "
                f"Only the local model `{self.options.name}` runs here (set OPENAI_API_KEY for OpenAI's models).",
                param="model",
                code="model_not_found",
            )

    async def list_models(self, request: Request) -> Response:
        """The one model served."""
        return _json({"object": "list", "data": [self._model_object()]})

    async def get_model(self, request: Request) -> Response:
        """The model, by name or alias."""
        self._check_model(request.path_params["model"])
        return _json(self._model_object())

    async def chat_completions(self, request: Request) -> Response:
        """A chat completion, whole or streamed."""
        arrived = time.monotonic()
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"Invalid request: {param or 'body'}: {err['msg']}", param=param) from None
        self._check_model(body.model)
        requested = body.max_completion_tokens or body.max_tokens or self.options.max_tokens
        job = Job(
            messages=[{"role": _role(m.role), "content": m.text()} for m in body.messages],
            sampling=body.sampling(),
            max_tokens=min(requested, self.options.max_tokens),
            deadline=arrived + self.options.timeout,
            loop=asyncio.get_running_loop(),
        )
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        self.worker.submit(job)
        try:
            first = await asyncio.wait_for(job.events.get(), self.options.timeout)
        except TimeoutError:
            job.cancelled.set()
            return _busy_error(self.options.timeout).response()
        except BaseException:
            job.cancelled.set()
            raise
        if isinstance(first, Failed):
            return first.error.response()
        if not body.stream:
            return await self._whole(job, first, completion_id)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            self._chunks(job, first, completion_id, include_usage),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-request-id": "req_" + secrets.token_hex(12)},
        )

    async def _events(self, job: Job, first: Event) -> AsyncIterator[Event]:
        event = first
        try:
            while True:
                yield event
                if not isinstance(event, Delta):
                    return
                event = await job.events.get()
        finally:
            job.cancelled.set()  # a no-op once the job has ended; stops it if the client left

    async def _whole(self, job: Job, first: Event, completion_id: str) -> Response:
        text: list[str] = []
        async for event in self._events(job, first):
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Failed):
                return event.error.response()
            else:
                return _json(
                    {
                        "id": completion_id,
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": self.options.name,
                        "system_fingerprint": None,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                                "logprobs": None,
                                "finish_reason": event.finish_reason,
                            }
                        ],
                        "usage": _usage(event.prompt_tokens, event.completion_tokens),
                    }
                )
        raise AssertionError("unreachable: a job always ends with Finished or Failed")

    async def _chunks(self, job: Job, first: Event, completion_id: str, include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.options.name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                data["usage"] = None
            return data

        yield _sse(chunk({"role": "assistant", "content": ""}))
        async for event in self._events(job, first):
            if isinstance(event, Delta):
                yield _sse(chunk({"content": event.text}))
            elif isinstance(event, Failed):
                yield _sse(event.error.body())
                return
            else:
                yield _sse(chunk({}, event.finish_reason))
                if include_usage:
                    yield _sse(
                        {**chunk({}), "choices": [], "usage": _usage(event.prompt_tokens, event.completion_tokens)}
                    )
        yield b"data: [DONE]\n\n"


def _role(role: str) -> str:
    # The model's chat template knows system, user and assistant.
    return {"developer": "system", "tool": "user"}.get(role, role)


def _die_with_parent(parent_pid: int | None) -> None:
    """Exit when the parent does: SIGTERM on its death (Linux), and at once if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.stderr.write(f"local_model_server: parent {parent_pid} is gone; exiting\n")
        sys.exit(0)


def _watch_stdin(server: uvicorn.Server) -> None:
    """Stop the server when stdin reaches end of file: the parent closed it, or died."""
    while sys.stdin.buffer.read(4096):
        pass
    server.should_exit = True


def parse_args(argv: list[str] | None = None) -> tuple[Options, int, int | None]:
    """Options, port and parent pid from the command line."""
    parser = argparse.ArgumentParser(prog="python -m app.services.local_model_server")
    parser.add_argument("--model", type=Path, required=True, help="the GGUF file")
    parser.add_argument("--name", required=True, help="the model's API name")
    parser.add_argument("--alias", action="append", default=[], help="another name it answers to")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--parent-pid", type=int, help="exit if this is not, or stops being, the parent")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    options = Options(
        model_path=args.model,
        name=args.name,
        aliases=tuple(args.alias),
        threads=args.threads,
        context=args.context,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
    )
    return options, args.port, args.parent_pid


def main(argv: list[str] | None = None) -> int:
    """Read the key, load the model, bind, print the port, serve until stdin closes or SIGTERM."""
    options, port, parent_pid = parse_args(argv)
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="local_model_server: %(message)s")
    api_key = sys.stdin.readline().strip()
    if not api_key:
        sys.stderr.write("local_model_server: expected the API key on the first line of stdin\n")
        return 2
    worker = ModelWorker(options)
    worker.load()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sys.stdout.write(f"{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout carried the port; anything else goes to stderr
    config = uvicorn.Config(
        LocalModelApp(worker, api_key).asgi(),
        loop="asyncio",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=_watch_stdin, args=(server,), name="stdin-watch", daemon=True).start()
    worker.start()
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
