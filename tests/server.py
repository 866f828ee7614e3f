"""Run an ASGI app under uvicorn on a free loopback port, in a background thread."""

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp


class ThreadedServer:
    """A real HTTP server for tests: `with ThreadedServer(app) as s: s.url`."""

    def __init__(self, app: ASGIApp, *, lifespan: str = "on", startup_timeout: float = 20.0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # An explicit IPPROTO_TCP lets asyncio set TCP_NODELAY on accepted
        # connections; without it every small response waits on Nagle's algorithm.
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            loop="auto",  # uvloop, as `python main.py serve` runs
            lifespan=lifespan,  # type: ignore[arg-type]
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._startup_timeout = startup_timeout

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} failed to start")
            time.sleep(0.005)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
