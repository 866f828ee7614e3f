"""Logs are structured and never carry keys or message bodies."""

import io
import json
import logging
import time
from collections.abc import Iterator

import httpx2
import pytest

from app.core.logging import JsonFormatter
from tests.conftest import ADMIN_KEY, Caller
from tests.fake_upstream import FakeUpstream
from tests.sse import collect


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("openai_service")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield buffer
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_logs_are_json_without_secrets_or_content(
    log_lines: io.StringIO, alice: Caller, admin: httpx2.Client, upstream: FakeUpstream
) -> None:
    secret_words = "zebra-quartz-secret-words"
    chat = alice.chat(title="private title", system_prompt="hidden prompt")
    upstream.fail_next(500, retry_after="0")
    assert alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": secret_words}).status_code == 200
    collect(alice.http, f"/api/v1/chats/{chat['id']}/messages", {"content": secret_words, "stream": True})
    new_key = admin.post(f"/api/v1/users/{alice.user_id}/keys", json={}).json()["key"]

    # creating alice (user, key), her chat, a send, a stream, a new key; a stream's line is
    # written once the server has finished with it, which can be just after the client is.
    expected = 6
    deadline = time.monotonic() + 5
    while log_lines.getvalue().count('"event":"request"') < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    text = log_lines.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    requests = [r for r in records if r["event"] == "request"]
    assert len(requests) == expected
    assert all(r["request_id"].startswith("req_") for r in requests)
    assert {"method", "path", "status", "duration_ms"} <= set(requests[0])
    assert any(r["event"] == "upstream_retry" for r in records)
    for forbidden in (alice.key, new_key, ADMIN_KEY, upstream.api_key, secret_words, "private title", "hidden prompt"):
        assert forbidden not in text
