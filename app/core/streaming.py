"""A streamed response that stops its producer as soon as the client hangs up.

Starlette's `StreamingResponse` does the same under ASGI 2.3 (uvicorn's
version) by running the stream and a disconnect listener in a task group:
three tasks and a cancel scope per response, a measurable share of a relayed
stream's CPU (bench/results/gateway.md). Here the stream runs in the request's
own task, and one small task waits for `http.disconnect`: if it comes while the
stream is still going, it cancels the request's task, so the producer sees
`CancelledError` at its current `await` exactly as it would under Starlette
(and can record a partial reply in its `finally`). The cancellation is then
taken back, and the response ends quietly: nobody is left to read it.
"""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class StreamResponse(Response):
    """Send `chunks` as they come (`text/event-stream` unless told otherwise)."""

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = "text/event-stream",
    ) -> None:
        self.chunks = chunks
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = _HangUpWatch(task)
        watcher = asyncio.create_task(watch.run(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watch.streaming = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watch.hung_up and task.uncancel() == 0:
                return
            raise
        finally:
            watch.streaming = False
            watcher.cancel()
            if (close := getattr(self.chunks, "aclose", None)) is not None:
                await close()  # a producer left at a `yield` ends now, not when collected


async def started(chunks: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
    """`chunks`, run to its first `yield`, which must be an empty chunk inside its `try`.

    Closing a generator that never started runs none of its code, so its `finally`
    (close the upstream stream, store and count the call) would never run if the
    response failed before its first chunk. Started, it always does.
    """
    first = await anext(chunks)
    assert first == b"", "a started stream yields b'' first"
    return chunks


class _HangUpWatch:
    __slots__ = ("hung_up", "streaming", "task")

    def __init__(self, task: "asyncio.Task[object]") -> None:
        self.task = task
        self.streaming = True
        self.hung_up = False

    async def run(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self.streaming:
            self.hung_up = True
            self.task.cancel()
