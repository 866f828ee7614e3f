"""The embedded local model, end to end: the service with no OPENAI_API_KEY starts the real
SmolLM2-135M-Instruct in a child process and answers through it, whole and streamed.

Replies are model output, so these tests assert their shape and the usage arithmetic, never
their words; each asks for a few tokens only.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from main import create_app
from tests.conftest import ADMIN_KEY, service_settings
from tests.fake_upstream import FakeUpstream
from tests.helpers import http_client
from tests.server import ThreadedServer
from tests.sse import collect

LOCAL_MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent


def local_app(database_url: str, **overrides: Any) -> FastAPI:
    """The service with no OPENAI_API_KEY, so with the local model."""
    # One thread: the service runs in this process too, and llama.cpp's threads slow down
    # sharply when they must share the cores with it.
    values: dict[str, Any] = {"openai_timeout": 60.0, "local_model_threads": 1} | overrides
    return create_app(service_settings(database_url, None, **values))


def new_client(url: str) -> httpx2.Client:
    """A client holding a fresh user's key, made through the admin key."""
    with http_client(url, ADMIN_KEY) as admin:
        user = admin.post("/api/v1/users", json={"name": "newcomer"})
        assert user.status_code == 201, user.text
        key = admin.post(f"/api/v1/users/{user.json()['id']}/keys", json={})
        assert key.status_code == 201, key.text
    return http_client(url, key.json()["key"])


def assert_usage(usage: dict[str, Any], max_completion: int) -> None:
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= max_completion
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def local_model_children() -> set[int]:
    """Pids of this process's children that run the local model server."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ppid == os.getpid() and b"app.services.local_model_server" in cmdline:
            found.add(int(entry.name))
    return found


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def local(database_url: str) -> Iterator[tuple[FastAPI, str]]:
    """The service on the local model, shared by this module's tests: (app, base URL)."""
    app = local_app(database_url)
    with ThreadedServer(app, startup_timeout=60) as server:
        yield app, server.url


def test_send_whole_and_streamed_through_the_local_model(local: tuple[FastAPI, str], database_url: str) -> None:
    app, url = local
    assert app.state.local_model is not None
    assert app.state.upstream.base_url == app.state.local_model.base_url
    with new_client(url) as client:
        created = client.post("/api/v1/chats", json={"title": "offline"})
        assert created.status_code == 201, created.text
        chat = created.json()
        assert chat["model"] == LOCAL_MODEL

        sent = client.post(
            f"/api/v1/chats/{chat['id']}/messages", json={"content": "Hello! Who are you?", "params": {"max_tokens": 8}}
        )
        assert sent.status_code == 200, sent.text
        whole = sent.json()["assistant_message"]
        assert whole["content"].strip()
        assert (whole["status"], whole["model"]) == ("complete", LOCAL_MODEL)
        assert whole["finish_reason"] in {"stop", "length"}
        assert_usage(whole["usage"], 8)
        assert sent.json()["usage"]["total_tokens"] == whole["usage"]["total_tokens"]

        got = collect(
            client,
            f"/api/v1/chats/{chat['id']}/messages",
            {"content": "Name a colour.", "stream": True, "params": {"max_tokens": 8}},
        )
        kinds = [kind for kind, _ in got]
        assert kinds[0] == "message.created"
        assert kinds[-2:] == ["message.completed", "done"]
        deltas = [data["delta"] for kind, data in got if kind == "message.delta"]
        assert deltas
        assert set(kinds[1:-2]) == {"message.delta"}
        streamed = got[-2][1]["message"]
        assert streamed["content"] == "".join(deltas)
        assert streamed["content"].strip()
        assert (streamed["status"], streamed["model"]) == ("complete", LOCAL_MODEL)
        assert_usage(streamed["usage"], 8)
        # The whole first turn is in the second prompt, so it has more tokens than the first.
        assert streamed["usage"]["prompt_tokens"] > whole["usage"]["prompt_tokens"]

        history = client.get(f"/api/v1/history/{chat['id']}")
        assert history.status_code == 200, history.text
        messages = history.json()["data"]
        assert [(m["role"], m["status"]) for m in messages] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        assert [m["content"] for m in messages] == [
            "Hello! Who are you?",
            whole["content"],
            "Name a colour.",
            streamed["content"],
        ]


def test_openai_sdk_talks_to_the_local_model_server(local: tuple[FastAPI, str]) -> None:
    model = local[0].state.local_model
    client = openai.OpenAI(base_url=model.base_url, api_key=model.api_key, max_retries=0)
    try:
        assert [m.id for m in client.models.list()] == [LOCAL_MODEL]
        reply = client.chat.completions.create(
            model=LOCAL_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.model == LOCAL_MODEL
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.completion_tokens <= 4
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        chunks = list(
            client.chat.completions.create(
                model=LOCAL_MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None
        assert 0 < last.usage.completion_tokens <= 4
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens

        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    finally:
        client.close()
    stranger = openai.OpenAI(base_url=model.base_url, api_key="sk-wrong", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_two_concurrent_sends_are_both_served(local: tuple[FastAPI, str]) -> None:
    _, url = local
    with new_client(url) as client:
        chats = [client.post("/api/v1/chats", json={}).json()["id"] for _ in range(2)]

        def send(chat_id: str) -> httpx2.Response:
            return client.post(
                f"/api/v1/chats/{chat_id}/messages", json={"content": "Tell me a story.", "params": {"max_tokens": 16}}
            )

        with ThreadPoolExecutor(max_workers=2) as pool:
            responses = list(pool.map(send, chats))
    for response in responses:
        assert response.status_code == 200, response.text
        reply = response.json()["assistant_message"]
        assert reply["status"] == "complete"
        assert reply["content"].strip()
        assert_usage(reply["usage"], 16)


def test_local_model_is_not_started_with_an_openai_key(database_url: str, upstream: FakeUpstream) -> None:
    before = local_model_children()
    app = create_app(service_settings(database_url, upstream))
    with ThreadedServer(app):
        assert app.state.local_model is None
        assert app.state.upstream.base_url == upstream.base_url
        assert app.state.runtime.default_model == "gpt-4o-mini"
        assert local_model_children() == before


def test_without_the_model_installed_send_is_503_with_a_hint(database_url: str, tmp_path: Path) -> None:
    app = local_app(database_url, local_model_path=tmp_path / "missing.gguf")
    with ThreadedServer(app) as server, new_client(server.url) as client:
        assert app.state.local_model is None
        chat = client.post("/api/v1/chats", json={}).json()
        assert chat["model"] == "gpt-4o-mini"
        response = client.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "upstream_not_configured"
    assert "OPENAI_API_KEY" in error["message"]
    assert "make local-model" in error["message"]


def test_stopping_the_service_leaves_no_child_process(database_url: str) -> None:
    app = local_app(database_url)
    with ThreadedServer(app, startup_timeout=60):
        pid = app.state.local_model.pid
        assert alive(pid)
    assert not alive(pid)
    assert pid not in local_model_children()


def test_a_crashed_local_model_is_restarted(database_url: str) -> None:
    app = local_app(database_url)
    with ThreadedServer(app, startup_timeout=60) as server, new_client(server.url) as client:
        model = app.state.local_model
        first = model.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: model.pid != first and alive(model.pid))
        chat = client.post("/api/v1/chats", json={}).json()

        def answered() -> bool:
            response = client.post(
                f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi", "params": {"max_tokens": 4}}
            )
            return response.status_code == 200

        wait_for(answered)
        restarted = model.pid
    assert not alive(first)
    assert not alive(restarted)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def started_local_model_pid(log: Path) -> int | None:
    """The child's pid from the service's `local_model_started` log line, once it is there."""
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "local_model_started":
            return int(json.loads(line)["pid"])
    return None


def test_local_model_dies_with_a_killed_service(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'killed.db'}",
        "PORT": str(free_port()),
        "LOG_LEVEL": "info",
        "LOCAL_MODEL": "true",
        "LOCAL_MODEL_THREADS": "1",
    }
    log = tmp_path / "service.log"
    # The working directory holds no .env, so no key comes from one.
    with log.open("w") as stderr:
        service = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env, stderr=stderr)
    try:

        def started() -> bool:
            assert service.poll() is None, log.read_text()
            return started_local_model_pid(log) is not None

        wait_for(started, timeout=60)
        pid = started_local_model_pid(log)
        assert pid is not None
        assert alive(pid)
        service.kill()  # SIGKILL: no shutdown code runs in the service
        service.wait(timeout=10)
        wait_for(lambda: not alive(pid), timeout=15)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
