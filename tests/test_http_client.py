"""The /v1 relay's upstream HTTP client, against scripted HTTP servers on loopback.

Each test starts a small asyncio server that answers as the test says (bytes on
the wire, timing, closes), then checks what the client makes of it: bodies,
headers, keep-alive reuse, timeouts, broken connections, back-pressure and TLS.
"""

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvloop

from app.services import http_client
from app.services.http_client import HTTPClient, TransportError, TransportTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Runner = Callable[[Coroutine[None, None, None]], None]


class Server:
    """A loopback server that runs `handler` per connection and notes what it saw."""

    def __init__(self, make: Callable[["Server"], Handler]) -> None:
        self.handler = make(self)
        self.port = 0
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and content-length body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(handler: Callable[[Server], Handler], tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(handler)
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    server.port = server.server.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        server.server.close()


def client_for(server: Server, scheme: str = "http", **options: object) -> HTTPClient:
    settings: dict[str, object] = {"timeout": 2.0, "connect_timeout": 2.0, **options}
    return HTTPClient(
        f"{scheme}://127.0.0.1:{server.port}/v1",
        {"authorization": "Bearer sk-test"},
        **settings,  # type: ignore[arg-type]
    )


Certificate = tuple[Path, ssl.SSLContext]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 (its file, for clients to trust) and a server context using it."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    return cert, server_tls


def keep_alive_json(body: bytes = b'{"ok":true}', status: bytes = b"200 OK") -> Callable[[Server], Handler]:
    """Answers every request on the connection with `body`, keeping the connection open."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await server.read_request(reader) is not None:
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nx-request-id: req_1\r\n"
                    b"content-length: %d\r\n\r\n" % len(body) + body
                )
                await writer.drain()

        return handle

    return make


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[None, None, None]], None]:
    """Runs a test's coroutine on asyncio's own loop, then on uvloop (what uvicorn picks in production)."""
    runner = asyncio.run if request.param == "asyncio" else uvloop.run

    def run(coroutine: Coroutine[None, None, None]) -> None:
        runner(coroutine)

    return run


def test_post_sends_the_body_and_fixed_headers_and_reads_the_whole_response(run: Runner) -> None:
    async def main() -> None:
        async with serve(keep_alive_json(b'{"id":"x"}', b"201 Created")) as server:
            client = client_for(server)
            response = await client.request("POST", "chat/completions", b'{"model":"m"}')
            assert response.status_code == 201
            assert response.headers["Content-Type"] == "application/json"
            assert response.headers.get("x-request-id") == "req_1"
            assert "X-REQUEST-ID" in response.headers
            assert await response.aread() == b'{"id":"x"}'
            assert response.content == b'{"id":"x"}'
            await client.aclose()
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
        assert set(lines[1:]) == {
            b"host: 127.0.0.1:%d" % server.port,
            b"accept: */*",
            b"accept-encoding: identity",
            b"authorization: Bearer sk-test",
            b"content-length: 13",
        }
        assert body == b'{"model":"m"}'

    run(main())


def test_a_get_has_no_body_and_keep_alive_reuses_one_connection(run: Runner) -> None:
    async def main() -> None:
        async with serve(keep_alive_json()) as server:
            client = client_for(server)
            for _ in range(5):
                response = await client.request("GET", "models")
                assert await response.aread() == b'{"ok":true}'
            await client.aclose()
        assert server.connections == 1
        assert [r.split(b"\r\n")[0] for r in server.requests] == [b"GET /v1/models HTTP/1.1"] * 5
        assert all(b"content-length" not in r for r in server.requests)

    run(main())


def test_concurrent_requests_use_separate_connections_up_to_the_limit(run: Runner) -> None:
    async def main() -> None:
        gate = asyncio.Event()

        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while await server.read_request(reader) is not None:
                    await gate.wait()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

            return handle

        async with serve(make) as server:
            client = client_for(server, max_connections=3)

            async def one() -> bytes:
                return await (await client.request("POST", "x", b"{}")).aread()

            tasks = [asyncio.create_task(one()) for _ in range(5)]
            await asyncio.sleep(0.2)
            assert server.connections == 3  # two requests wait for a free connection
            gate.set()
            assert await asyncio.gather(*tasks) == [b"ok"] * 5
            await client.aclose()
        assert server.connections == 3
        assert len(server.requests) == 5

    run(main())


def test_chunked_stream_arrives_piece_by_piece_as_sent(run: Runner) -> None:
    async def main() -> None:
        release = asyncio.Event()

        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                writer.write(b"7\r\ndata: 1\r\n")
                await writer.drain()
                await release.wait()
                writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
                await writer.drain()

            return handle

        async with serve(make) as server:
            client = client_for(server)
            response = await client.request("POST", "chat/completions", b"{}")
            assert response.headers["content-type"] == "text/event-stream"
            assert await anext(response) == b"data: 1"  # before the server sends the rest
            release.set()
            assert [piece async for piece in response] == [b"data: 2"]
            await client.aclose()

    run(main())


def test_a_connection_that_breaks_mid_body_raises_and_is_not_reused(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                request = await server.read_request(reader)
                if len(server.requests) == 1:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                    await writer.drain()
                    return  # closes with 93 bytes missing
                while request is not None:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    request = await server.read_request(reader)

            return handle

        async with serve(make) as server:
            client = client_for(server)
            response = await client.request("POST", "x", b"{}")
            with pytest.raises(TransportError, match="closed the connection before the response ended"):
                await response.aread()
            again = await client.request("POST", "x", b"{}")
            assert await again.aread() == b"ok"
            await client.aclose()
        assert server.connections == 2

    run(main())


def test_read_timeout_for_headers_and_between_pieces(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                if len(server.requests) == 2:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
                    await writer.drain()
                await asyncio.sleep(5)

            return handle

        async with serve(make) as server:
            client = client_for(server, timeout=0.2)
            with pytest.raises(TransportTimeout, match=r"sent nothing for 0\.2 s"):
                await client.request("POST", "x", b"{}")
            response = await client.request("POST", "x", b"{}")
            assert await anext(response) == b"a"
            with pytest.raises(TransportTimeout):
                await anext(response)
            await client.aclose()
        assert server.connections == 2  # a timed-out connection is never reused

    run(main())


def test_connect_failure_is_a_transport_error(run: Runner) -> None:
    async def main() -> None:
        async with serve(keep_alive_json()) as server:
            port = server.port
        client = HTTPClient(f"http://127.0.0.1:{port}/v1", {}, timeout=1.0, connect_timeout=1.0)
        with pytest.raises(TransportError, match="Could not connect to the upstream"):
            await client.request("POST", "x", b"{}")
        await client.aclose()

    run(main())


def test_a_stale_kept_alive_connection_is_retried_once_on_a_fresh_one(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
                if server.connections == 1:
                    # Read the next request, then close without answering: the keep-alive
                    # race, as when a server times out an idle connection just as it is reused.
                    await server.read_request(reader)

            return handle

        async with serve(make) as server:
            client = client_for(server)
            assert await (await client.request("POST", "x", b"{}")).aread() == b"ok"
            assert await (await client.request("POST", "x", b"{}")).aread() == b"ok"
            await client.aclose()
        assert server.connections == 2
        assert len(server.requests) == 3

    run(main())


def test_connection_close_and_idle_expiry_open_new_connections(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while await server.read_request(reader) is not None:
                    close = b"connection: close\r\n" if len(server.requests) == 1 else b""
                    writer.write(b"HTTP/1.1 200 OK\r\n" + close + b"content-length: 2\r\n\r\nok")
                    await writer.drain()

            return handle

        async with serve(make) as server:
            client = client_for(server, idle_seconds=0.1)
            for pause in (0.0, 0.0, 0.2, 0.0):
                await asyncio.sleep(pause)
                assert await (await client.request("GET", "models")).aread() == b"ok"
            await client.aclose()
        # 1: closed by the server; 2 and 3 on a new one; 4 after it idled past 0.1 s.
        assert server.connections == 3

    run(main())


def test_a_response_closed_early_frees_its_slot_and_drops_its_connection(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while await server.read_request(reader) is not None:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
                    await writer.drain()

            return handle

        async with serve(make) as server:
            client = client_for(server, max_connections=1)
            for _ in range(3):
                response = await client.request("POST", "x", b"{}")
                assert await anext(response) == b"01234"
                await response.aclose()
            await client.aclose()
        assert server.connections == 3

    run(main())


def test_a_slow_reader_pauses_the_socket(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "HIGH_WATER", 64 * 1024)
    monkeypatch.setattr(http_client, "LOW_WATER", 16 * 1024)
    total = 32 * 1024 * 1024  # more than the kernel buffers on both sides can hold

    async def main() -> None:
        sent = 0

        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                nonlocal sent
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
                block = b"x" * 65536
                while sent < total:
                    writer.write(block)
                    await writer.drain()
                    sent += len(block)

            return handle

        async with serve(make) as server:
            client = client_for(server)
            response = await client.request("POST", "x", b"{}")
            await asyncio.sleep(0.5)
            assert sent < total // 2  # the server is held back while nobody reads
            received = sum([len(piece) async for piece in response])
            assert received == total
            await client.aclose()

    run(main())


def test_a_malformed_response_is_a_transport_error(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"SPDY/9 banana\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(1)

            return handle

        async with serve(make) as server:
            client = client_for(server)
            with pytest.raises(TransportError, match="malformed HTTP response"):
                await client.request("POST", "x", b"{}")
            await client.aclose()

    run(main())


def test_line_breaks_in_fixed_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        HTTPClient("http://127.0.0.1:1/v1", {"authorization": "Bearer x\r\nx-evil: 1"}, timeout=1, connect_timeout=1)
    with pytest.raises(ValueError, match="not an http"):
        HTTPClient("ftp://example.com/", {}, timeout=1, connect_timeout=1)


def test_https_verifies_the_certificate(run: Runner, certificate: Certificate) -> None:
    cert, server_tls = certificate

    async def main() -> None:
        async with serve(keep_alive_json(), tls=server_tls) as server:
            trusting = ssl.create_default_context(cafile=str(cert))
            client = client_for(server, "https", tls=trusting)
            assert await (await client.request("GET", "models")).aread() == b'{"ok":true}'
            await client.aclose()
            default = client_for(server, "https")  # certifi and the system's CAs: not this certificate
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                await default.request("GET", "models")
            await default.aclose()

    run(main())


def test_a_body_ended_by_closing_the_connection_is_whole(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n")
                writer.write(b'{"id":"old-style"}')
                await writer.drain()  # then the connection closes: the body's end

            return handle

        async with serve(make) as server:
            client = client_for(server)
            response = await client.request("POST", "x", b"{}")
            assert await response.aread() == b'{"id":"old-style"}'
            assert await (await client.request("POST", "x", b"{}")).aread() == b'{"id":"old-style"}'
            await client.aclose()
        assert server.connections == 2  # never reused: it is closed

    run(main())


def test_a_read_cancelled_mid_body_gives_its_connection_slot_back(run: Runner) -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while await server.read_request(reader) is not None:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
                    await writer.drain()

            return handle

        async with serve(make) as server:
            client = client_for(server, max_connections=1, timeout=1.0)
            for _ in range(3):  # with the one slot lost, the second request would wait and time out
                response = await client.request("POST", "x", b"{}")
                reading = asyncio.ensure_future(response.aread())
                await asyncio.sleep(0.05)
                reading.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reading
            await client.aclose()
        assert server.connections == 3

    run(main())


def test_waiting_for_a_free_connection_times_out(run: Runner) -> None:
    async def main() -> None:
        async with serve(keep_alive_json()) as server:
            client = client_for(server, max_connections=1, timeout=0.2)
            held = await client.request("GET", "models")  # its body unread: the one slot stays taken
            with pytest.raises(TransportTimeout, match=r"No free upstream connection within 0\.2 s"):
                await client.request("GET", "models")
            assert await held.aread() == b'{"ok":true}'
            assert await (await client.request("GET", "models")).aread() == b'{"ok":true}'
            await client.aclose()

    run(main())


def test_the_environment_proxy_is_found_as_httpx_finds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    assert http_client.environment_proxy("https://api.openai.com/v1") == "http://proxy.internal:3128"
    assert http_client.environment_proxy("https://127.0.0.1:8443/v1") is None
    assert http_client.environment_proxy("http://api.openai.com/v1") is None


def test_only_http_proxies_are_taken() -> None:
    with pytest.raises(ValueError, match="only http:// proxies"):
        HTTPClient("https://api.openai.com/v1", {}, timeout=1, connect_timeout=1, proxy="socks5://127.0.0.1:1080")


def connect_proxy(seen: list[bytes], answer: bytes | None = None) -> Callable[[Server], Handler]:
    """An HTTP proxy that opens CONNECT tunnels (or, given `answer`, refuses with it)."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
                return
            host, port = head.split(b" ")[1].decode().rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                sink.close()

            try:
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
            finally:
                up_writer.close()

        return handle

    return make


def test_https_through_a_connect_proxy_with_credentials(run: Runner, certificate: Certificate) -> None:
    cert, server_tls = certificate
    seen: list[bytes] = []

    async def main() -> None:
        async with serve(keep_alive_json(), tls=server_tls) as upstream, serve(connect_proxy(seen)) as proxy:
            client = HTTPClient(
                f"https://127.0.0.1:{upstream.port}/v1",
                {"authorization": "Bearer sk-test"},
                timeout=2.0,
                connect_timeout=2.0,
                tls=ssl.create_default_context(cafile=str(cert)),
                proxy=f"http://ops:s%40cret@127.0.0.1:{proxy.port}",
            )
            for _ in range(2):  # the second request reuses the tunnel
                assert await (await client.request("POST", "chat/completions", b"{}")).aread() == b'{"ok":true}'
            await client.aclose()
            assert upstream.requests[0].split(b"\r\n")[0] == b"POST /v1/chat/completions HTTP/1.1"
            assert len(upstream.requests) == 2
        assert seen == [
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
            b"proxy-authorization: Basic b3BzOnNAY3JldA==\r\n\r\n" % (upstream.port, upstream.port)
        ]

    run(main())


def test_a_proxy_refusing_the_tunnel_is_a_transport_error(run: Runner) -> None:
    seen: list[bytes] = []

    async def main() -> None:
        refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n"
        async with serve(connect_proxy(seen, refusal)) as proxy:
            client = HTTPClient(
                "https://api.openai.com/v1",
                {},
                timeout=2.0,
                connect_timeout=2.0,
                proxy=f"http://127.0.0.1:{proxy.port}",
            )
            with pytest.raises(TransportError, match=r"refused the tunnel .*407 Proxy Authentication Required"):
                await client.request("GET", "models")
            await client.aclose()
        assert seen == [b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n\r\n"]

    run(main())


def test_plain_http_through_a_proxy_names_the_upstream_in_full(run: Runner) -> None:
    async def main() -> None:
        async with serve(keep_alive_json()) as proxy:  # it answers itself, as a caching proxy may
            client = HTTPClient(
                "http://upstream.internal:8080/v1",
                {},
                timeout=2.0,
                connect_timeout=2.0,
                proxy=f"http://ops:pw@127.0.0.1:{proxy.port}",
            )
            assert await (await client.request("GET", "models")).aread() == b'{"ok":true}'
            await client.aclose()
        lines = proxy.requests[0].split(b"\r\n")
        assert lines[0] == b"GET http://upstream.internal:8080/v1/models HTTP/1.1"
        assert b"host: upstream.internal:8080" in lines
        assert b"proxy-authorization: Basic b3BzOnB3" in lines

    run(main())
