"""The load generator of the gateway benchmark: raw asyncio HTTP/1.1 keep-alive clients.

Each client is one persistent connection sending one request at a time; a run
is a fixed number of requests shared by `concurrency` clients. The client side
costs a few tens of microseconds per request (uvloop, no HTTP library), so the
gateway on the other core stays the bottleneck. For streams it notes the time
to the first event carrying non-empty `content` (time to first token).

    python bench/gateway_load.py --port 9101 --requests 2000 --concurrency 32 [--stream] [--key K]
"""

import argparse
import asyncio
import contextlib
import json
import re
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

try:
    import uvloop
except ImportError:  # plain asyncio then
    uvloop = None  # type: ignore[assignment]

FIRST_CONTENT = re.compile(rb'"content"\s*:\s*"[^"]')


def chat_body(model: str, stream: bool, include_usage: bool = False) -> bytes:
    payload: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "temperature": 0.2,
    }
    if stream:
        payload["stream"] = True
        if include_usage:
            payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload, separators=(",", ":")).encode()


def build_request(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"accept: application/json\r\ncontent-length: {len(body)}\r\n"
    )
    if key:
        head += f"authorization: Bearer {key}\r\n"
    return head.encode() + b"\r\n" + body


@dataclass(slots=True)
class Reply:
    status: int
    latency: float  # seconds from the request's write to the response's end
    ttft: float | None  # seconds to the first non-empty content (streams)
    body: bytes
    headers: dict[str, str]


class _ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; parses Content-Length and chunked responses."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.in_body = False
        self.chunked = False
        self.remaining = 0
        self.chunk_left = -1  # -1: expecting a size line
        self.body_parts: list[bytes] = []
        self.scan = b""  # decoded body not yet searched for the first content
        self.sent = 0.0
        self.ttft: float | None = None
        self.want_ttft = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-response"))

    def request(self, raw: bytes, want_ttft: bool) -> "asyncio.Future[Reply]":
        assert self.transport is not None
        assert self.waiter is None
        self._reset()
        self.want_ttft = want_ttft
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent = time.perf_counter()
        self.transport.write(raw)
        return self.waiter

    def _body(self, data: bytes) -> None:
        self.body_parts.append(data)
        if self.want_ttft and self.ttft is None:
            self.scan += data
            if FIRST_CONTENT.search(self.scan):
                self.ttft = time.perf_counter() - self.sent
                self.scan = b""

    def _finish(self) -> None:
        waiter, self.waiter = self.waiter, None
        reply = Reply(self.status, time.perf_counter() - self.sent, self.ttft, b"".join(self.body_parts), self.headers)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def data_received(self, data: bytes) -> None:  # noqa: PLR0912 - one small state machine
        self.buffer += data
        while self.buffer:
            if not self.in_body:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buffer[:end].decode("latin-1").split("\r\n")
                self.buffer = self.buffer[end + 4 :]
                self.status = int(lines[0].split(" ", 2)[1])
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    self.headers[name.strip().lower()] = value.strip()
                self.in_body = True
                self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
                if not self.chunked:
                    self.remaining = int(self.headers.get("content-length", "0"))
                    if self.remaining == 0:
                        self.in_body = False
                        self._finish()
                continue
            if not self.chunked:
                piece = self.buffer[: self.remaining]
                self.buffer = self.buffer[len(piece) :]
                self.remaining -= len(piece)
                self._body(piece)
                if self.remaining == 0:
                    self.in_body = False
                    self._finish()
                continue
            if self.chunk_left < 0:
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(self.buffer[:line_end].split(b";")[0], 16)
                if size == 0:
                    # the last chunk; no trailers expected
                    if len(self.buffer) < line_end + 4:
                        return
                    self.buffer = self.buffer[line_end + 4 :]
                    self.in_body = False
                    self._finish()
                    continue
                self.buffer = self.buffer[line_end + 2 :]
                self.chunk_left = size
            if len(self.buffer) < self.chunk_left + 2:
                if self.chunk_left and len(self.buffer) > 0:
                    take = min(len(self.buffer), self.chunk_left)
                    self._body(self.buffer[:take])
                    self.buffer = self.buffer[take:]
                    self.chunk_left -= take
                return
            self._body(self.buffer[: self.chunk_left])
            self.buffer = self.buffer[self.chunk_left + 2 :]
            self.chunk_left = -1


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.protocol: _ClientProtocol | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_ClientProtocol, self.host, self.port)
        self.protocol = protocol

    async def send(self, raw: bytes, want_ttft: bool = False) -> Reply:
        if self.protocol is None or self.protocol.closed:
            await self.open()
        assert self.protocol is not None
        return await self.protocol.request(raw, want_ttft)

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


@dataclass
class RunResult:
    requests: int
    concurrency: int
    wall: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    overhead_ms: list[float] = field(default_factory=list)  # x-openai-service-overhead-ms, when sent
    client_cpu: float = 0.0  # this process's CPU seconds during the run

    @property
    def rate(self) -> float:
        return (self.requests - self.errors) / self.wall if self.wall else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttfts) * 1000 if self.ttfts else float("nan")


def _check(reply: Reply, stream: bool) -> str | None:
    if reply.status != 200:
        return f"HTTP {reply.status}: {reply.body[:200]!r}"
    if stream:
        if not reply.body.rstrip().endswith(b"data: [DONE]") or reply.ttft is None:
            return f"stream did not end with [DONE] or had no content: {reply.body[-200:]!r}"
    elif b'"chat.completion"' not in reply.body:
        return f"not a chat.completion: {reply.body[:200]!r}"
    return None


async def run(
    host: str,
    port: int,
    raw: bytes,
    *,
    requests: int,
    concurrency: int,
    stream: bool,
    on_ready: Callable[[], None] | None = None,
) -> RunResult:
    """Send `requests` requests over `concurrency` keep-alive connections; `on_ready` runs once all are open."""
    connections = [Connection(host, port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in connections))
    result = RunResult(requests, concurrency, 0.0)
    left = requests

    async def worker(connection: Connection) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                reply = await connection.send(raw, want_ttft=stream)
            except (ConnectionError, OSError) as exc:
                result.errors += 1
                result.first_error = result.first_error or repr(exc)
                continue
            problem = _check(reply, stream)
            if problem is not None:
                result.errors += 1
                result.first_error = result.first_error or problem
                continue
            result.latencies.append(reply.latency)
            if reply.ttft is not None:
                result.ttfts.append(reply.ttft)
            if (overhead := reply.headers.get("x-openai-service-overhead-ms")) is not None:
                result.overhead_ms.append(float(overhead))

    if on_ready is not None:
        on_ready()
    cpu0, started = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        result.wall = time.perf_counter() - started
        result.client_cpu = time.process_time() - cpu0
        for connection in connections:
            connection.close()
    return result


def new_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop when it is installed."""
    if uvloop is None:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--key")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    raw = build_request(args.host, args.port, args.path, chat_body(args.model, args.stream), args.key)
    with new_runner() as runner:
        result = runner.run(
            run(args.host, args.port, raw, requests=args.requests, concurrency=args.concurrency, stream=args.stream)
        )
    print(
        f"{result.requests} requests, concurrency {result.concurrency}: {result.rate:.1f}/s, "
        f"p50 {result.p50_ms:.2f} ms, ttft p50 {result.ttft_p50_ms:.2f} ms, errors {result.errors} "
        f"{result.first_error or ''}; client CPU {result.client_cpu / max(result.requests, 1) * 1e6:.0f} us/request"
    )


if __name__ == "__main__":
    main()
