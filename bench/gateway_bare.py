"""The bare pass-through baselines of the gateway benchmark.

A minimal Starlette app that forwards the request body to the upstream and
relays the response (or the stream, chunk by chunk): no auth, no parsing, no
accounting. With `--client httpx2` (the default) it talks to the upstream with
`httpx2.AsyncClient`, as openai_service does; with `--client raw` through a
lean keep-alive HTTP/1.1 client on asyncio + httptools that openai_service's
`/v1` relay uses (app/services/http_client.py), to show what the upstream
client itself costs.

    python bench/gateway_bare.py --port 9101 --upstream http://127.0.0.1:9100/v1 [--client raw]
"""

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.services.http_client import HTTPClient


async def _healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def _app(routes: list[Route], close: Callable[[], Awaitable[None]]) -> Starlette:
    """The pass-through's app: its routes, `/healthz`, and the upstream client closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await close()

    return Starlette(routes=[*routes, Route("/healthz", _healthz, methods=["GET"])], lifespan=lifespan)


def create_raw_app(upstream: str) -> Starlette:
    client = HTTPClient(upstream, {"authorization": "Bearer anything"}, timeout=60.0, connect_timeout=10.0)

    async def chat_completions(request: Request) -> Response:
        response = await client.request("POST", "chat/completions", await request.body())
        content_type = response.headers.get("content-type") or "application/json"
        if content_type.startswith("text/event-stream"):
            return StreamingResponse(
                response,
                status_code=response.status_code,
                media_type=content_type,
                background=BackgroundTask(response.aclose),
            )
        return Response(await response.aread(), status_code=response.status_code, media_type=content_type)

    return _app([Route("/v1/chat/completions", chat_completions, methods=["POST"])], client.aclose)


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

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
    return _app(routes, client.aclose)


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
