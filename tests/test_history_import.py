"""Importing whole transcripts (validated, all or nothing, idempotent) and exporting them as JSON and Markdown."""

import threading
from typing import Any

import httpx2
import pytest

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import assert_error, fetch_rows

TRANSCRIPT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris & Oslo? ☀️ «ça va»", "name": "ann"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
        ],
    },
    {"role": "tool", "content": '{"c": 18}', "tool_call_id": "call_a"},
    {"role": "tool", "content": '{"c": -3}', "tool_call_id": "call_b"},
    {
        "role": "assistant",
        "content": "Let me check more.",
        "tool_calls": [
            {"id": "call_c", "type": "function", "function": {"name": "forecast", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "content": "rain", "tool_call_id": "call_c"},
    {"role": "assistant", "content": "Paris **18C**, Oslo -3C.\n\n```\n# not a heading\n```"},
    {"role": "system", "content": "Mid-chat note."},
    {"role": "user", "content": ""},
]


def body(**fields: Any) -> dict[str, Any]:
    return {"title": "Weather", "messages": TRANSCRIPT} | fields


def import_(caller: Caller, payload: dict[str, Any], key: str | None = None) -> httpx2.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return caller.http.post("/api/v1/history/import", json=payload, headers=headers)


def imported(caller: Caller, payload: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    response = import_(caller, payload, key)
    assert response.status_code == 201, response.text
    chat: dict[str, Any] = response.json()
    return chat


def export(caller: Caller, chat_id: str) -> dict[str, Any]:
    response = caller.http.get(f"/api/v1/history/{chat_id}/export")
    assert response.status_code == 200, response.text
    exported: dict[str, Any] = response.json()
    return exported


def chat_ids(caller: Caller) -> list[str]:
    return [c["id"] for c in caller.http.get("/api/v1/chats", params={"limit": 100}).json()["data"]]


def history(caller: Caller, chat_id: str) -> list[dict[str, Any]]:
    response = caller.http.get(f"/api/v1/history/{chat_id}", params={"limit": 100})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


# --------------------------------------------------------------------------- import


def test_import_creates_a_chat_with_the_transcript(alice: Caller, upstream: FakeUpstream) -> None:
    chat = imported(alice, body(system_prompt="Chat prompt.", metadata={"source": "app"}, tags=["travel"]))
    assert chat["object"] == "chat"
    assert (chat["title"], chat["system_prompt"], chat["message_count"]) == ("Weather", "Chat prompt.", 10)
    assert (chat["metadata"], chat["tags"]) == ({"source": "app"}, ["travel"])
    stored = history(alice, chat["id"])
    assert [(m["role"], m["content"]) for m in stored] == [(m["role"], m["content"] or "") for m in TRANSCRIPT]
    assert stored[2]["tool_calls"] == TRANSCRIPT[2]["tool_calls"]
    assert [m["tool_call_id"] for m in stored if m["role"] == "tool"] == ["call_a", "call_b", "call_c"]
    assert stored[1]["name"] == "ann"
    assert [m["parent_id"] for m in stored] == [None] + [m["id"] for m in stored[:-1]]
    assert upstream.requests == []


def test_a_leading_system_message_stays_a_message(alice: Caller) -> None:
    chat = imported(
        alice, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    )
    assert chat["system_prompt"] is None
    assert [(m["role"], m["content"]) for m in history(alice, chat["id"])] == [("system", "Be brief."), ("user", "hi")]


def test_an_empty_transcript_makes_an_empty_chat(alice: Caller) -> None:
    chat = imported(alice, {"messages": []})
    assert (chat["title"], chat["message_count"]) == (None, 0)
    assert export(alice, chat["id"])["messages"] == []


def test_a_sent_message_continues_an_imported_chat(alice: Caller, upstream: FakeUpstream) -> None:
    chat = imported(alice, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    response = alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "c"})
    assert response.status_code == 200, response.text
    assert [m["content"] for m in history(alice, chat["id"])] == ["a", "b", "c", "Echo: c"]
    assert upstream.requests[-1].body["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def test_import_with_a_model_the_key_may_not_use_is_404(make_user: Any) -> None:
    limited = make_user("limited", allowed_models=["gpt-4o-mini"])
    response = import_(limited, body(model="gpt-4o"))
    assert_error(response, 404, code="model_not_found", param="model")
    assert chat_ids(limited) == []


@pytest.mark.parametrize(
    ("messages", "status", "code", "param"),
    [
        (
            [{"role": "tool", "content": "x", "tool_call_id": "c1"}],
            400,
            "invalid_message_order",
            "messages.0.tool_call_id",
        ),
        (
            [*TRANSCRIPT[:3], {"role": "tool", "content": "x", "tool_call_id": "call_z"}],
            400,
            "invalid_message_order",
            "messages.3.tool_call_id",
        ),
        ([*TRANSCRIPT[:4], {"role": "user", "content": "too soon"}], 400, "invalid_message_order", "messages.4"),
        ([{"role": "developer", "content": "x"}], 400, "invalid_value", "messages.0.role"),
        ([{"role": "function", "content": "x", "name": "f"}], 400, "invalid_value", "messages.0.role"),
        ([{"role": "user", "content": "ok"}] * 10_001, 400, "invalid_value", "messages"),
    ],
    ids=["tool first", "unknown call", "unanswered call", "developer role", "function role", "10001 messages"],
)
def test_invalid_import_is_refused_whole(
    alice: Caller, database_url: str, messages: list[dict[str, Any]], status: int, code: str, param: str
) -> None:
    response = import_(alice, {"title": "bad", "messages": messages})
    assert_error(response, status, code=code, param=param)
    assert chat_ids(alice) == []
    assert fetch_rows(database_url, "SELECT count(*) FROM messages") == [(0,)]


def test_import_of_10000_messages_is_accepted(alice: Caller) -> None:
    chat = imported(alice, {"messages": [{"role": "user", "content": "x"}] * 10_000})
    assert chat["message_count"] == 10_000


@pytest.mark.parametrize(
    "fields",
    [{"title": "t" * 513}, {"metadata": {f"k{i}": "v" for i in range(17)}}, {"params": {"temperature": 3}}, {"x": 1}],
    ids=["long title", "17 metadata keys", "bad params", "unknown field"],
)
def test_import_with_invalid_chat_fields_is_400(alice: Caller, fields: dict[str, Any]) -> None:
    response = import_(alice, body(**fields))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_value"
    assert chat_ids(alice) == []


# --------------------------------------------------------------------------- idempotency


def test_a_retried_import_with_the_same_key_returns_the_same_chat(alice: Caller, database_url: str) -> None:
    first = import_(alice, body(), key="import-1")
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    again = import_(alice, body(), key="import-1")
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert chat_ids(alice) == [first.json()["id"]]
    assert fetch_rows(database_url, "SELECT count(*) FROM messages") == [(len(TRANSCRIPT),)]


def test_the_same_key_with_another_body_is_409(alice: Caller) -> None:
    first = imported(alice, body(), key="import-1")
    response = import_(alice, body(title="Other"), key="import-1")
    assert_error(response, 409, code="idempotency_key_reused", param="Idempotency-Key")
    assert chat_ids(alice) == [first["id"]]


def test_without_a_key_every_import_makes_a_chat(alice: Caller) -> None:
    first, second = imported(alice, body()), imported(alice, body())
    assert first["id"] != second["id"]
    assert sorted(chat_ids(alice)) == sorted([first["id"], second["id"]])


def test_keys_belong_to_their_user(alice: Caller, bob: Caller) -> None:
    alices = imported(alice, body(), key="shared-key")
    bobs = imported(bob, body(title="Bob's"), key="shared-key")
    assert alices["id"] != bobs["id"]
    assert chat_ids(bob) == [bobs["id"]]


def test_after_the_chat_is_deleted_the_key_imports_afresh(alice: Caller) -> None:
    first = imported(alice, body(), key="k")
    assert alice.http.delete(f"/api/v1/chats/{first['id']}").status_code == 200
    second = imported(alice, body(), key="k")
    assert second["id"] != first["id"]
    assert chat_ids(alice) == [second["id"]]


def test_concurrent_retries_with_one_key_make_one_chat(alice: Caller, service: str, database_url: str) -> None:
    attempts = 8
    responses: list[httpx2.Response] = []
    start = threading.Barrier(attempts)

    def attempt() -> None:
        with httpx2.Client(base_url=service, headers={"authorization": f"Bearer {alice.key}"}, timeout=60) as http:
            start.wait()
            responses.append(http.post("/api/v1/history/import", json=body(), headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in responses] == [201] * attempts
    assert len({r.json()["id"] for r in responses}) == 1
    assert sorted(r.headers.get("idempotent-replayed", "") for r in responses) == [""] + ["true"] * (attempts - 1)
    assert chat_ids(alice) == [responses[0].json()["id"]]
    assert fetch_rows(database_url, "SELECT count(*) FROM messages") == [(len(TRANSCRIPT),)]


@pytest.mark.parametrize("key", ["", "k" * 256, "has space", "tab\tkey"], ids=["empty", "256 chars", "space", "tab"])
def test_malformed_idempotency_key_is_400(alice: Caller, key: str) -> None:
    response = import_(alice, body(), key=key)
    assert_error(response, 400, code="invalid_value", param="Idempotency-Key")
    assert chat_ids(alice) == []


# --------------------------------------------------------------------------- export


def test_export_is_the_import_body(alice: Caller) -> None:
    payload = body(
        model="gpt-4o",
        system_prompt="Prompt.",
        instructions="Be kind.",
        params={"temperature": 0.5},
        metadata={"k": "v"},
        tags=["a", "b"],
        pinned=True,
    )
    chat = imported(alice, payload)
    response = alice.http.get(f"/api/v1/history/{chat['id']}/export")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"] == f'attachment; filename="{chat["id"]}.json"'
    assert response.json() == {
        "title": "Weather",
        "model": "gpt-4o",
        "system_prompt": "Prompt.",
        "instructions": "Be kind.",
        "params": {"temperature": 0.5},
        "context": {},
        "metadata": {"k": "v"},
        "tags": ["a", "b"],
        "pinned": True,
        "messages": TRANSCRIPT,
    }


def test_round_trip_import_export_import_export_is_exact(alice: Caller) -> None:
    first = export(alice, imported(alice, body(system_prompt="p", context={"strategy": "none"}))["id"])
    second_chat = imported(alice, first)
    second = export(alice, second_chat["id"])
    assert second == first
    assert second["messages"] == TRANSCRIPT
    assert second_chat["message_count"] == len(TRANSCRIPT)


def test_round_trip_normalises_text_parts_and_empty_tool_call_content(alice: Caller) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": [{"type": "text", "text": "r"}], "tool_call_id": "c1"},
    ]
    first = export(alice, imported(alice, {"messages": messages})["id"])
    assert first["messages"] == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
    ]
    assert export(alice, imported(alice, first)["id"]) == first


def test_export_of_a_sent_chat_leaves_out_failed_replies(alice: Caller, upstream: FakeUpstream) -> None:
    chat_id = alice.chat(title="sent")["id"]
    alice.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "one"})
    upstream.fail_next(500, times=3, retry_after="0")
    assert alice.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "two"}).status_code == 502
    assert export(alice, chat_id)["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]


def test_export_holds_the_current_branch_only(alice: Caller, upstream: FakeUpstream) -> None:
    chat_id = alice.chat()["id"]
    old = alice.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "q"}).json()["assistant_message"]
    upstream.queue_reply("better")
    regenerated = alice.http.post(f"/api/v1/chats/{chat_id}/messages/{old['id']}/regenerate", json={})
    assert regenerated.status_code == 200, regenerated.text
    assert export(alice, chat_id)["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "better"},
    ]
    markdown = alice.http.get(f"/api/v1/history/{chat_id}/export", params={"format": "markdown"}).text
    assert "Echo: q" not in markdown
    assert "better" in markdown


def test_export_after_clear_has_no_messages(alice: Caller) -> None:
    chat = imported(alice, body())
    alice.http.delete(f"/api/v1/history/{chat['id']}")
    assert export(alice, chat["id"])["messages"] == []


def test_deleted_chat_cannot_be_exported(alice: Caller) -> None:
    chat = imported(alice, body())
    alice.http.delete(f"/api/v1/chats/{chat['id']}")
    response = alice.http.get(f"/api/v1/history/{chat['id']}/export")
    assert_error(response, 404, code="not_found", param="chat_id")


def test_markdown_export_shows_every_text_verbatim(alice: Caller) -> None:
    chat = imported(
        alice,
        {
            "title": "Notes # <b>bold</b> *x*",
            "system_prompt": "Sys",
            "tags": ["t_1"],
            "messages": [
                {"role": "user", "content": "# Not a heading\n<script>alert(1)</script>", "name": "a*b"},
                {
                    "role": "assistant",
                    "content": "Fence:\n```python\nx = 1\n```\n",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "run", "arguments": '{"a": "`"}'}},
                    ],
                },
                {"role": "tool", "content": "", "tool_call_id": "c1"},
            ],
        },
    )
    response = alice.http.get(f"/api/v1/history/{chat['id']}/export", params={"format": "markdown"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.headers["content-disposition"] == f'attachment; filename="{chat["id"]}.md"'
    created = response.text.splitlines()[3]
    assert created.startswith("- Created: ")
    assert response.text == "\n".join(
        [
            r"# Notes \# \<b\>bold\<\/b\> \*x\*",
            "",
            f"- Chat: `{chat['id']}`",
            created,
            "- Messages: 3",
            r"- Tags: t\_1",
            "",
            "## System prompt",
            "",
            "```text",
            "Sys",
            "```",
            "",
            r"## 1. User (a\*b)",
            "",
            "```text",
            "# Not a heading",
            "<script>alert(1)</script>",
            "```",
            "",
            "## 2. Assistant",
            "",
            "````text",
            "Fence:",
            "```python",
            "x = 1",
            "```",
            "````",
            "",
            "Tool call `c1`: `run`",
            "",
            "```json",
            '{"a": "`"}',
            "```",
            "",
            "## 3. Tool, answering `c1`",
            "",
            "*(no text)*",
            "",
        ]
    )


def test_unknown_export_format_is_400(alice: Caller) -> None:
    chat = imported(alice, body())
    response = alice.http.get(f"/api/v1/history/{chat['id']}/export", params={"format": "pdf"})
    assert_error(response, 400, code="invalid_value", param="format")
