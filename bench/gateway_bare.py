"""The bare pass-through baselines of the gateway benchmark.

A minimal Starlette app that forwards the request body to the upstream and
relays the response (or the stream, chunk by chunk): no auth, no parsing, no
accounting. With `--client httpx2` (the default) it talks to the upstream with
`httpx2.AsyncClient`, as openai_service does; with `--client raw` through a
minimal keep-alive HTTP/1.1 client on asyncio + httptools (RawUpstream below),
to show what the upstream client itself costs.

    python bench/gateway_bare.py --port 9101 --upstream http://127.0.0.1:9100/v1 [--client raw]
"""

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx2
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream; one request at a time."""

    def __init__(self, pool: "RawUpstream") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self.body: asyncio.Queue[bytes | None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head is not None and not self.head.done():
            self.head.set_exception(ConnectionError("upstream closed the connection"))
        if self.body is not None:
            self.body.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_result((self.parser.get_status_code(), self.headers))

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.put_nowait(body)

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        if self.body is not None:
            self.body.put_nowait(None)
        if keep:
            self.pool.idle.append(self)
        elif self.transport is not None:
            self.transport.close()

    def send(
        self, raw: bytes
    ) -> tuple["asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]]", "asyncio.Queue[bytes | None]"]:
        assert self.transport is not None
        self.headers = []
        self.head = asyncio.get_running_loop().create_future()
        self.body = asyncio.Queue()
        self.transport.write(raw)
        return self.head, self.body


class RawUpstream:
    """A minimal keep-alive HTTP/1.1 client pool (asyncio + httptools), POST only."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.prefix = url.path.rstrip("/")
        self.idle: list[_UpstreamConnection] = []

    async def _connection(self) -> _UpstreamConnection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: _UpstreamConnection(self), self.host, self.port)
        return connection

    async def post(self, path: str, body: bytes) -> tuple[int, dict[bytes, bytes], "asyncio.Queue[bytes | None]"]:
        connection = await self._connection()
        raw = (
            f"POST {self.prefix}/{path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"authorization: Bearer anything\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        head, chunks = connection.send(raw)
        status, headers = await head
        return status, dict(headers), chunks

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()


def create_raw_app(upstream: str) -> Starlette:
    client = RawUpstream(upstream)

    async def relay(chunks: "asyncio.Queue[bytes | None]") -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    async def chat_completions(request: Request) -> Response:
        status, headers, chunks = await client.post("chat/completions", await request.body())
        content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
        if content_type.startswith("text/event-stream"):
            return StreamingResponse(relay(chunks), status_code=status, media_type=content_type)
        parts = [chunk async for chunk in relay(chunks)]
        return Response(b"".join(parts), status_code=status, media_type=content_type)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        client.close()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def create_app(upstream: str) -> Starlette:
    client = httpx2.AsyncClient(
        base_url=upstream.rstrip("/") + "/",
        headers={"authorization": "Bearer anything", "content-type": "application/json"},
        timeout=httpx2.Timeout(60.0),
        limits=httpx2.Limits(max_connections=256, max_keepalive_connections=64),
    )

    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        response = await client.send(client.build_request("POST", "chat/completions", content=body), stream=True)
        content_type = response.headers.get("content-type", "application/json")
        if content_type.startswith("text/event-stream"):
            return StreamingResponse(
                response.aiter_raw(),
                status_code=response.status_code,
                media_type=content_type,
                background=BackgroundTask(response.aclose),
            )
        content = await response.aread()
        await response.aclose()
        return Response(content, status_code=response.status_code, media_type=content_type)

    async def models(request: Request) -> Response:
        response = await client.get("models")
        return Response(response.content, status_code=response.status_code, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100/v1")
    parser.add_argument("--client", choices=["httpx2", "raw"], default="httpx2")
    args = parser.parse_args()
    app = create_raw_app(args.upstream) if args.client == "raw" else create_app(args.upstream)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
