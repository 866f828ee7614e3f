"""A zero-delay fake OpenAI upstream for the gateway benchmark (not the thing measured).

Raw asyncio HTTP/1.1 with keep-alive (uvloop when installed), so that it costs
next to nothing beside the gateway it feeds:

- `POST /v1/chat/completions`: a fixed `chat.completion`; with `"stream": true`
  a role chunk, 20 content chunks, a finish chunk, the usage chunk when
  `stream_options.include_usage` is true, and `data: [DONE]`, each event its
  own chunked-encoding write (as a real upstream sends tokens one by one);
- `GET /v1/models` and `GET /v1/models/{id}`;
- `GET /_stats`: how many requests it has served (a sanity check for the bench).

    python bench/gateway_upstream.py --port 9100
"""

import argparse
import asyncio
import contextlib
import json
import signal
import socket
from typing import Any, cast

try:
    import uvloop
except ImportError:  # plain asyncio then
    uvloop = None  # type: ignore[assignment]

CONTENT_CHUNKS = 20
CREATED = 1_700_000_000
MODEL_IDS = ("bench-model", "gpt-4o-mini")


def _chat_completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello! This is a fixed answer from the zero-delay fake upstream.",
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 14,
                "total_tokens": 26,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
        },
        separators=(",", ":"),
    ).encode()


def _stream_events(model: str, include_usage: bool) -> list[bytes]:
    """The SSE events of one streamed completion, each already framed as an HTTP chunk."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
            "choices": choices,
        }
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return body

    events = [
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    ]
    events += [
        chunk([{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None, "finish_reason": None}])
        for i in range(CONTENT_CHUNKS)
    ]
    events.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    if include_usage:
        usage = {
            "prompt_tokens": 12,
            "completion_tokens": CONTENT_CHUNKS,
            "total_tokens": 12 + CONTENT_CHUNKS,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        events.append(chunk([], usage=usage))
    payloads = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    payloads.append(b"data: [DONE]\n\n")
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in payloads]


def _models() -> bytes:
    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "bench"} for m in MODEL_IDS]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


class Stats:
    requests = 0  # chat completions served
    streams = 0


class _Cache:
    completions: dict[str, bytes] = {}
    streams: dict[tuple[str, bool], list[bytes]] = {}


def _response(status: str, body: bytes, keep_alive: bool, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nx-request-id: req_bench\r\nopenai-processing-ms: 0\r\n"
        + (b"" if keep_alive else b"connection: close\r\n")
        + b"\r\n"
        + body
    )


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
    b"x-request-id: req_bench\r\nopenai-processing-ms: 0\r\ncache-control: no-cache\r\n\r\n"
)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy: asyncio.Task[None] | None = None  # a stream being written: later requests wait
        self.queue: list[tuple[str, str, dict[str, str], bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy is not None:
            self.busy.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            parsed = self._next_request()
            if parsed is None:
                return
            self.queue.append(parsed)
            self._drain()

    def _next_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            pos = start
            while True:
                line_end = self.buffer.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(self.buffer[pos:line_end].split(b";")[0], 16)
                if len(self.buffer) < line_end + 2 + size + 2:
                    return None
                if size == 0:
                    # no trailers expected
                    pos = line_end + 4
                    break
                body += self.buffer[line_end + 2 : line_end + 2 + size]
                pos = line_end + 2 + size + 2
            self.buffer = self.buffer[pos:]
            return method, target, headers, body
        length = int(headers.get("content-length", "0") or 0)
        if len(self.buffer) < start + length:
            return None
        body = self.buffer[start : start + length]
        self.buffer = self.buffer[start + length :]
        return method, target, headers, body

    def _drain(self) -> None:
        while self.queue and self.busy is None and self.transport is not None:
            method, target, headers, body = self.queue.pop(0)
            self._handle(method, target, headers, body)

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        keep_alive = headers.get("connection", "").lower() != "close"
        path = target.split("?", 1)[0].rstrip("/")
        if path.startswith("/v1/"):
            path = path[3:]
        if method == "POST" and path == "/chat/completions":
            Stats.requests += 1
            try:
                payload = json.loads(body)
            except ValueError:
                transport.write(_response("400 Bad Request", b'{"error":{"message":"bad json"}}', keep_alive))
                return
            model = str(payload.get("model") or "bench-model")
            if payload.get("stream") is True:
                Stats.streams += 1
                include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
                key = (model, include_usage)
                events = _Cache.streams.get(key)
                if events is None:
                    events = _Cache.streams[key] = _stream_events(model, include_usage)
                self.busy = asyncio.ensure_future(self._stream(events, keep_alive))
                return
            completion = _Cache.completions.get(model)
            if completion is None:
                completion = _Cache.completions[model] = _chat_completion(model)
            transport.write(_response("200 OK", completion, keep_alive))
        elif method == "GET" and path == "/models":
            transport.write(_response("200 OK", _models(), keep_alive))
        elif method == "GET" and path.startswith("/models/"):
            model_id = path[len("/models/") :]
            body = json.dumps({"id": model_id, "object": "model", "created": CREATED, "owned_by": "bench"}).encode()
            transport.write(_response("200 OK", body, keep_alive))
        elif method == "GET" and path == "/_stats":
            body = json.dumps({"requests": Stats.requests, "streams": Stats.streams}).encode()
            transport.write(_response("200 OK", body, keep_alive))
        else:
            transport.write(_response("404 Not Found", b'{"error":{"message":"not found"}}', keep_alive))
        if not keep_alive:
            transport.close()

    async def _stream(self, events: list[bytes], keep_alive: bool) -> None:
        try:
            transport = self.transport
            if transport is None:
                return
            transport.write(STREAM_HEAD)
            for event in events:
                await asyncio.sleep(0)  # each event its own write, as tokens arrive one by one
                if self.transport is None:
                    return
                transport.write(event)
            transport.write(b"0\r\n\r\n")
            if not keep_alive:
                transport.close()
        finally:
            self.busy = None
            self._drain()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop) if uvloop is not None else asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
