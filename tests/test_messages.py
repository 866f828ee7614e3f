"""Sending messages: whole and streamed replies, upstream failures, disconnects, concurrency."""

import asyncio
import time
from typing import Any

import httpx2
import pytest

from app.core.security import Principal
from main import create_app
from tests.conftest import Caller, service_settings
from tests.fake_upstream import FakeUpstream
from tests.server import ThreadedServer
from tests.sse import collect, events


def usage(
    prompt: int, completion: int, cached: int = 0, reasoning: int = 0, source: str = "reported"
) -> dict[str, Any]:
    """Usage as the service reports it. Counts are o200k_base tokens, as OpenAI counts for gpt-4o-mini."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
        "source": source,
    }


def send(caller: Caller, chat_id: str, **body: Any) -> httpx2.Response:
    return caller.http.post(f"/api/v1/chats/{chat_id}/messages", json=body)


def history(caller: Caller, chat_id: str) -> list[dict[str, Any]]:
    response = caller.http.get(f"/api/v1/history/{chat_id}", params={"limit": 100})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def test_send_stores_both_messages_and_returns_usage(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat(title="greetings")
    response = send(alice, chat["id"], content="hello there")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.exchange"
    user, reply = body["user_message"], body["assistant_message"]
    assert (user["role"], user["content"], user["status"]) == ("user", "hello there", "complete")
    assert (reply["role"], reply["content"], reply["status"]) == ("assistant", "Echo: hello there", "complete")
    assert reply["parent_id"] == user["id"]
    assert reply["model"] == "gpt-4o-mini"
    assert reply["finish_reason"] == "stop"
    # prompt: 3 + (3 + "user" 1 + "hello there" 2) + 3 priming; completion: "Echo", ":", " hello", " there"
    assert reply["usage"] == usage(9, 4)
    assert body["usage"] == reply["usage"]
    assert [m["id"] for m in history(alice, chat["id"])] == [user["id"], reply["id"]]
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 2


def test_send_reports_cached_and_reasoning_tokens(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.cached_tokens = 4
    upstream.reasoning_tokens = 7
    chat = alice.chat()
    reply = send(alice, chat["id"], content="hi").json()["assistant_message"]
    assert reply["usage"] == usage(8, 3 + 7, cached=4, reasoning=7)


def test_context_sent_upstream_has_system_prompt_and_history(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat(system_prompt="Be brief.")
    send(alice, chat["id"], content="first")
    send(alice, chat["id"], content="second")
    sent = upstream.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Echo: first"},
        {"role": "user", "content": "second"},
    ]


def test_chat_params_and_overrides_reach_the_upstream(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat(model="gpt-4o", params={"temperature": 0.2, "max_tokens": 50, "stop": ["END"]})
    send(alice, chat["id"], content="a", params={"temperature": 0.9, "seed": 7}, model="gpt-4.1-mini")
    sent = upstream.requests[-1].body
    assert sent["model"] == "gpt-4.1-mini"
    assert sent["temperature"] == 0.9
    assert sent["seed"] == 7
    assert sent["max_completion_tokens"] == 50
    assert "max_tokens" not in sent
    assert sent["stop"] == ["END"]
    assert sent["stream"] is False


def test_stream_emits_typed_events_and_stores_reply(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat()
    got = collect(alice.http, f"/api/v1/chats/{chat['id']}/messages", {"content": "one two", "stream": True})
    kinds = [kind for kind, _ in got]
    assert kinds == ["message.created", "message.delta", "message.delta", "message.delta", "message.completed", "done"]
    created, completed = got[0][1], got[-2][1]
    assert created["type"] == "message.created"
    assert created["message"]["content"] == "one two"
    assert [data["delta"] for kind, data in got if kind == "message.delta"] == ["Echo:", " one", " two"]
    reply = completed["message"]
    assert all(data["message_id"] == reply["id"] for kind, data in got if kind == "message.delta")
    assert (reply["content"], reply["status"], reply["finish_reason"]) == ("Echo: one two", "complete", "stop")
    assert reply["usage"] == usage(9, 4)
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    assert [m["content"] for m in history(alice, chat["id"])] == ["one two", "Echo: one two"]


def test_stream_without_usage_chunk_stores_estimated_usage(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.omit_usage_next()
    chat = alice.chat()
    got = collect(alice.http, f"/api/v1/chats/{chat['id']}/messages", {"content": "x", "stream": True})
    reply = got[-2][1]["message"]
    assert (reply["content"], reply["status"]) == ("Echo: x", "complete")
    # Counted here, exactly as the upstream would have: prompt 3 + (3 + 1 + 1) + 3, reply "Echo", ":", " x".
    assert reply["usage"] == usage(8, 3, source="estimated")


def test_stream_cut_by_upstream_ends_with_error_event_and_keeps_partial(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.cut_stream_next(after_chunks=2)
    chat = alice.chat()
    got = collect(alice.http, f"/api/v1/chats/{chat['id']}/messages", {"content": "a b c d", "stream": True})
    assert [kind for kind, _ in got] == ["message.created", "message.delta", "message.delta", "error", "done"]
    assert got[-2][1]["error"]["code"] == "upstream_stream_broken"
    stored = history(alice, chat["id"])[-1]
    assert (stored["role"], stored["content"], stored["status"]) == ("assistant", "Echo: a", "partial")
    assert stored["error"]["code"] == "upstream_stream_broken"


def test_client_disconnect_mid_stream_stores_partial_reply(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.slow_stream(0.2)
    chat = alice.chat()
    words = " ".join(f"w{i}" for i in range(30))
    with alice.http.stream(
        "POST", f"/api/v1/chats/{chat['id']}/messages", json={"content": words, "stream": True}
    ) as r:
        seen = []
        for kind, data in events(r):
            if kind == "message.delta":
                seen.append(data["delta"])
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stored = history(alice, chat["id"])
        if len(stored) == 2:
            break
        time.sleep(0.05)
    reply = stored[-1]
    assert reply["status"] == "partial"
    assert reply["error"]["code"] == "client_disconnected"
    assert reply["content"].startswith("".join(seen))
    assert ("Echo: " + words).startswith(reply["content"])
    assert len(reply["content"]) < len("Echo: " + words)


def test_upstream_429_is_retried_then_surfaces_with_retry_after(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, times=3, retry_after="0")
    chat = alice.chat()
    response = send(alice, chat["id"], content="hi")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "0"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert len(upstream.requests) == 3
    stored = history(alice, chat["id"])
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "error")]


def test_retry_after_longer_than_allowed_is_not_waited_for(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, retry_after="30")
    response = send(alice, alice.chat()["id"], content="hi")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert len(upstream.requests) == 1


def test_one_upstream_failure_is_retried_transparently(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(500, retry_after="0")
    response = send(alice, alice.chat()["id"], content="hi")
    assert response.status_code == 200
    assert response.json()["assistant_message"]["content"] == "Echo: hi"
    assert len(upstream.requests) == 2


def test_upstream_500_three_times_is_502(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(500, times=3, retry_after="0")
    response = send(alice, alice.chat()["id"], content="hi")
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert len(upstream.requests) == 3


def test_upstream_401_is_our_502_not_401(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(401, code="invalid_api_key")
    response = send(alice, alice.chat()["id"], content="hi")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert len(upstream.requests) == 1


def test_upstream_400_is_a_400_with_its_message_and_no_retry(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(400, message="Invalid 'temperature'.", code="invalid_value")
    response = send(alice, alice.chat()["id"], content="hi")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Invalid 'temperature'."
    assert len(upstream.requests) == 1


def test_upstream_timeout_is_504_after_three_attempts(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.hang_next(3, times=3)
    response = send(alice, alice.chat()["id"], content="hi")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert len(upstream.requests) == 3


def test_stream_open_failure_is_a_plain_http_error(alice: Caller, upstream: FakeUpstream) -> None:
    upstream.fail_next(401)
    chat = alice.chat()
    response = send(alice, chat["id"], content="hi", stream=True)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert [m["status"] for m in history(alice, chat["id"])] == ["complete", "error"]


def test_eight_concurrent_sends_store_every_message_once_in_pairs(alice: Caller, service: str) -> None:
    chat = alice.chat()

    async def run() -> list[int]:
        async with httpx2.AsyncClient(
            base_url=service, headers={"authorization": f"Bearer {alice.key}"}, timeout=30
        ) as client:
            responses = await asyncio.gather(
                *(client.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": f"m{i}"}) for i in range(8))
            )
            return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * 8
    stored = history(alice, chat["id"])
    assert len(stored) == 16
    users, replies = stored[0::2], stored[1::2]
    assert sorted(m["content"] for m in users) == sorted(f"m{i}" for i in range(8))
    assert all(m["role"] == "user" for m in users)
    for user, reply in zip(users, replies, strict=True):
        assert reply["role"] == "assistant"
        assert reply["parent_id"] == user["id"]
        assert reply["content"] == f"Echo: {user['content']}"
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 16


def test_without_upstream_configured_send_is_503(database_url: str, alice: Caller) -> None:
    chat = alice.chat()
    with ThreadedServer(create_app(service_settings(database_url, None, local_model=False))) as server:
        response = httpx2.post(
            f"{server.url}/api/v1/chats/{chat['id']}/messages",
            json={"content": "hi"},
            headers={"authorization": f"Bearer {alice.key}"},
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_not_configured"
    assert "OPENAI_API_KEY" in response.json()["error"]["message"]
    assert history(alice, chat["id"]) == []


@pytest.mark.parametrize("model", ["gpt-4o", "o3-mini"])
def test_key_model_allow_list_is_enforced_before_upstream(model: str) -> None:
    principal = Principal("usr_x", "user", "key_x", None, ("gpt-4o",))
    if model == "gpt-4o":
        principal.check_model(model)
    else:
        with pytest.raises(Exception, match="does not exist or you do not have access"):
            principal.check_model(model)
