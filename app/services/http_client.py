"""A lean HTTP/1.1 client for the `/v1` relay: asyncio + httptools, one origin, keep-alive.

The relay needs little of an HTTP client: one upstream origin, a POST or GET
whose body is already in memory, the response's status and headers, then its
body whole or as it arrives. httpx2 does all of that and much more, and on this
path it costs about 2 ms of CPU per request (bench/results/gateway.md: a bare
pass-through on httpx2 against the same with this client), which was most of
the gateway's overhead. This client does only what the relay needs:

- a pool of keep-alive connections (at most `max_connections` in use, waited for at
  most the read timeout; at most `max_idle` kept idle, each for at most `idle_seconds`),
  reused last-in first-out;
- a connect timeout, and a read timeout for every wait on the upstream (for the
  headers, then between body pieces), as httpx's `Timeout(read=...)`;
- TLS for `https://` upstreams, verified against the system's certificates and
  certifi's bundle (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured);
- back-pressure: a streamed body that the caller reads slower than it arrives
  pauses the socket past `HIGH_WATER` bytes;
- bodies framed by `content-length`, chunked encoding or the end of the connection;
  no request compression, and `accept-encoding: identity` so bodies relay as they are;
- a request that a kept-alive connection swallowed (closed before any byte of an
  answer) is sent once more on a new connection: the usual keep-alive race, in which
  the upstream almost always never saw it; an upstream that crashed while working on
  it may see it twice.

- an `http://` proxy (`proxy`; the service passes what `HTTPS_PROXY` and friends say,
  as httpx does): a CONNECT tunnel for an `https://` upstream, absolute request targets
  for an `http://` one; `user:password@` in the proxy URL becomes Basic proxy auth.

It does not follow redirects, speak HTTP/2 or use SOCKS or `https://` proxies, and it
ignores any query string in the base URL.
A response must be read to its end or closed (`aclose`); only then is its
connection free for the next request.
"""

import asyncio
import base64
import ssl
import time
import urllib.request
from collections import deque
from typing import Self, cast
from urllib.parse import unquote, urlsplit

import certifi
import httptools

HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18


class TransportError(Exception):
    """The upstream could not be reached, broke the connection, or spoke no HTTP."""


class TransportTimeout(TransportError):
    """The upstream did not connect or answer within the timeout."""


class Headers(dict[str, str]):
    """A response's headers, names lowercased (a repeated header's values joined by ", ")."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)


class Response:
    """A response whose body is read whole (`aread`) or piece by piece (`async for`)."""

    __slots__ = (
        "_buffered",
        "_complete",
        "_connection",
        "_error",
        "_framed",
        "_pieces",
        "_raw_headers",
        "_released",
        "_timeout",
        "_waiter",
        "content",
        "headers",
        "received",
        "status_code",
    )

    def __init__(self, connection: "_Connection", timeout: float) -> None:
        self.status_code = 0
        self.headers = Headers()
        self.content = b""
        self.received = False  # any byte of the response has arrived
        self._connection = connection
        self._timeout = timeout
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._error: TransportError | None = None
        self._released = False
        self._framed = False  # content-length or chunked: else the body ends when the connection does

    # The connection's side.

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _headers_complete(self, status: int) -> None:
        self.status_code = status
        headers = self.headers
        for raw_name, raw_value in self._raw_headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            self._framed |= name in ("content-length", "transfer-encoding")
            previous = dict.get(headers, name)
            dict.__setitem__(headers, name, value if previous is None else f"{previous}, {value}")
        self._raw_headers = []
        self._wake()

    def _feed(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self._buffered += len(piece)
        if self._buffered > HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: TransportError) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()

    # The caller's side.

    async def _wait(self) -> None:
        """Wait for the connection to deliver something (headers, a piece, the end or an error)."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._timeout, self._time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _time_out(self, waiter: "asyncio.Future[None]") -> None:
        if not waiter.done():
            self._error = TransportTimeout(f"The upstream sent nothing for {self._timeout:g} s.")
            self._connection.abort()
            waiter.set_result(None)

    async def _head(self) -> None:
        while not self.status_code:
            if self._error is not None:
                self._release()
                raise self._error
            await self._wait()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._pieces:
                piece = self._pieces.popleft()
                self._buffered -= len(piece)
                if self._buffered < LOW_WATER:
                    self._connection.resume()
                return piece
            if self._error is not None:
                self._release()
                raise self._error
            if self._complete:
                self._release()
                raise StopAsyncIteration
            try:
                await self._wait()
            except BaseException:  # cancelled mid-body: the connection cannot be reused
                self._close()
                raise

    def aiter_bytes(self) -> Self:
        return self

    async def aread(self) -> bytes:
        """The whole body (also kept as `content`)."""
        self.content = b"".join([piece async for piece in self])
        return self.content

    async def aclose(self) -> None:
        """Give the connection back: reusable if the body was read to its end, else closed."""
        self._close()

    def _close(self) -> None:
        if not self._complete:
            self._connection.abort()
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._connection.release(reusable=self._complete and self._error is None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, client: "HTTPClient") -> None:
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: Response | None = None
        self._keep_alive = False
        self._paused = False
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        response.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response._fail(TransportError(f"The upstream sent a malformed HTTP response ({exc})."))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client._open.discard(self)
        response, self._response = self._response, None
        if response is None:
            return
        if exc is None and response.status_code and not response._framed:
            response._finish()  # an HTTP/1.0-style body, ended by closing the connection
        else:
            response._fail(TransportError("The upstream closed the connection before the response ended."))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        if self._response is not None:
            self._response._headers_complete(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response, self._response = self._response, None
        if not self._keep_alive:
            self.abort()
        if response is not None:
            response._finish()

    # The client's side.

    def send(self, request: bytes, timeout: float) -> Response:
        assert self._transport is not None
        response = self._response = Response(self, timeout)
        self._transport.write(request)
        return response

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def release(self, *, reusable: bool) -> None:
        self._response = None
        self._client._release(self, reusable and not self.closed and self._keep_alive and not self._paused)


class _TunnelHandshake(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT (its status line), before TLS takes the connection over."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n\r\n" in self._buffer and not self.answer.done():
            self.answer.set_result(self._buffer.split(b"\r\n", 1)[0].decode("latin-1"))
        elif len(self._buffer) > 65536 and not self.answer.done():
            self.answer.set_exception(TransportError("The proxy's answer to CONNECT is too long."))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(TransportError("The proxy closed the connection instead of opening a tunnel."))


class HTTPClient:
    """Requests to one origin over a pool of keep-alive HTTP/1.1 connections."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int = 256,
        max_idle: int = 64,
        idle_seconds: float = 15.0,
        tls: ssl.SSLContext | None = None,
        proxy: str | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (tls or _tls_context()) if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/") + "/"
        default_port = self._port == (443 if url.scheme == "https" else 80)
        authority = self._host if default_port else f"{self._host}:{self._port}"
        if ":" in self._host:  # an IPv6 literal
            authority = f"[{self._host}]" if default_port else f"[{self._host}]:{self._port}"
        self._target = self._prefix  # what a request line names, before the path
        self._tunnel_to = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        fixed = {"host": authority, "accept": "*/*", "accept-encoding": "identity", **headers}
        self._proxy: tuple[str, int, str | None] | None = None
        if proxy is not None:
            parts = urlsplit(proxy)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"only http:// proxies are supported, not {proxy!r}")
            auth = None
            if parts.username is not None:
                credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
                auth = "Basic " + base64.b64encode(credentials).decode("ascii")
            self._proxy = (parts.hostname, parts.port or 80, auth)
            if self._ssl is None:  # plain HTTP goes through the proxy, named in full
                self._target = f"http://{authority}{self._prefix}"
                if auth is not None:
                    fixed["proxy-authorization"] = auth
        for name, value in fixed.items():
            if "\r" in name + value or "\n" in name + value:
                raise ValueError(f"header {name!r} holds a line break")
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode("latin-1")
        self.base_url = base_url
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    async def request(self, method: str, path: str, body: bytes = b"") -> Response:
        """Send a request; returns once the response's headers have arrived (its body unread)."""
        if self._closed:
            raise TransportError("The HTTP client is closed.")
        head = f"{method} {self._target}{path.lstrip('/')} HTTP/1.1\r\n".encode("latin-1")
        length = b"content-length: %d\r\n\r\n" % len(body) if body or method == "POST" else b"\r\n"
        request = head + self._fixed + length + body
        for attempt in range(2):
            try:
                async with asyncio.timeout(self._timeout):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise TransportTimeout(f"No free upstream connection within {self._timeout:g} s.") from exc
            try:
                connection, reused = self._idle_connection(), True
                if connection is None:
                    connection, reused = await self._connect(), False
            except BaseException:
                self._slots.release()
                raise
            response = connection.send(request, self._timeout)
            try:
                await response._head()  # on a failure, the response has given its slot back
            except TransportError:
                # A kept-alive connection the upstream closed as we wrote to it: the
                # request never reached it, so one fresh connection may try again.
                stale = reused and not response.received and not isinstance(response._error, TransportTimeout)
                if attempt == 0 and stale:
                    continue
                raise
            except BaseException:  # cancelled while waiting
                response._close()
                raise
            return response
        raise AssertionError("unreachable")

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self._idle_seconds:
                return connection
            connection.abort()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._proxy is None:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None,
                    )
                elif self._ssl is None:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self), self._proxy[0], self._proxy[1]
                    )
                else:
                    connection = await self._tunnel(self._proxy, self._ssl)
        except TimeoutError as exc:
            raise TransportTimeout(f"Could not connect to the upstream within {self._connect_timeout:g} s.") from exc
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"Could not connect to the upstream ({exc}).") from exc
        if self._closed:  # closed while connecting
            connection.abort()
            raise TransportError("The HTTP client is closed.")
        self._open.add(connection)
        return connection

    async def _tunnel(self, proxy: tuple[str, int, str | None], tls: ssl.SSLContext) -> _Connection:
        """A TLS connection to the upstream through the proxy's CONNECT tunnel."""
        host, port, auth = proxy
        loop = asyncio.get_running_loop()
        transport, handshake = await loop.create_connection(_TunnelHandshake, host, port)
        try:
            ask = f"CONNECT {self._tunnel_to} HTTP/1.1\r\nhost: {self._tunnel_to}\r\n"
            if auth is not None:
                ask += f"proxy-authorization: {auth}\r\n"
            transport.write(ask.encode("latin-1") + b"\r\n")
            status_line = await handshake.answer
            if status_line.split(" ")[1:2] != ["200"]:
                raise TransportError(f"The proxy refused the tunnel to the upstream ({status_line}).")
            connection = _Connection(self)
            secure = await loop.start_tls(transport, connection, tls, server_hostname=self._host)
            if secure is None:
                raise TransportError("The TLS handshake through the proxy did not complete.")
        except BaseException:
            transport.abort()
            raise
        connection.connection_made(secure)
        return connection

    def _release(self, connection: _Connection, reusable: bool) -> None:
        """A response is done with its connection (called once per request)."""
        self._slots.release()
        if reusable and not self._closed and len(self._idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.abort()
            self._open.discard(connection)

    async def aclose(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = True
        for connection in list(self._open):
            connection.abort()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks


def environment_proxy(base_url: str) -> str | None:
    """The proxy that `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` set for `base_url`, as httpx finds it."""
    url = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    return proxy if proxy and not urllib.request.proxy_bypass(url.hostname or "") else None


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(certifi.where())
    return context
