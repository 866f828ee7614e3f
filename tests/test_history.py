"""History: paged reads, saving messages made elsewhere, clearing, retention, and isolation between users."""

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.database import create_session_factory
from app.db.models import utcnow
from app.services.history import PurgeResult, purge_history
from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import assert_error, execute, fetch_rows, missing_chat_id

ROOT = Path(__file__).resolve().parents[1]


def user(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: str | None, *call_ids: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if call_ids:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
            for call_id in call_ids
        ]
    return message


def tool(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def save(caller: Caller, chat_id: str, *messages: dict[str, Any]) -> httpx2.Response:
    return caller.http.post(f"/api/v1/history/{chat_id}", json={"messages": list(messages)})


def saved(caller: Caller, chat_id: str, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    response = save(caller, chat_id, *messages)
    assert response.status_code == 201, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def page(caller: Caller, chat_id: str, **params: Any) -> dict[str, Any]:
    response = caller.http.get(f"/api/v1/history/{chat_id}", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def contents(caller: Caller, chat_id: str) -> list[str]:
    return [m["content"] for m in page(caller, chat_id, limit=100)["data"]]


def numbered(caller: Caller, count: int) -> tuple[str, list[str]]:
    """A chat holding messages "m1".."m<count>", and their ids in order."""
    chat_id: str = caller.chat(title="numbered")["id"]
    ids = [m["id"] for m in saved(caller, chat_id, *(user(f"m{i}") for i in range(1, count + 1)))]
    return chat_id, ids


# --------------------------------------------------------------------------- reading


def test_empty_chat_reads_as_an_empty_page(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    assert page(alice, chat_id) == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_pages_walk_forward_and_end_exactly_at_a_page_boundary(alice: Caller) -> None:
    chat_id, ids = numbered(alice, 6)
    first = page(alice, chat_id, limit=3)
    assert [m["id"] for m in first["data"]] == ids[:3]
    assert (first["first_id"], first["last_id"], first["has_more"]) == (ids[0], ids[2], True)
    second = page(alice, chat_id, limit=3, after=first["last_id"])
    assert [m["id"] for m in second["data"]] == ids[3:]
    assert (second["first_id"], second["last_id"], second["has_more"]) == (ids[3], ids[5], False)
    assert page(alice, chat_id, limit=3, after=ids[5]) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


def test_pages_walk_backward_with_order_desc(alice: Caller) -> None:
    chat_id, ids = numbered(alice, 5)
    first = page(alice, chat_id, limit=2, order="desc")
    assert [m["id"] for m in first["data"]] == [ids[4], ids[3]]
    assert first["has_more"] is True
    second = page(alice, chat_id, limit=2, order="desc", after=first["last_id"])
    assert [m["id"] for m in second["data"]] == [ids[2], ids[1]]
    assert second["has_more"] is True
    third = page(alice, chat_id, limit=2, order="desc", after=second["last_id"])
    assert [m["id"] for m in third["data"]] == [ids[0]]
    assert third["has_more"] is False


def test_one_page_holding_exactly_every_message_has_no_more(alice: Caller) -> None:
    chat_id, ids = numbered(alice, 4)
    body = page(alice, chat_id, limit=4)
    assert [m["id"] for m in body["data"]] == ids
    assert body["has_more"] is False


def test_forward_pages_neither_repeat_nor_skip_when_messages_arrive_between_them(alice: Caller) -> None:
    chat_id, ids = numbered(alice, 4)
    first = page(alice, chat_id, limit=2)
    ids += [m["id"] for m in saved(alice, chat_id, user("m5"), user("m6"))]
    seen = [m["id"] for m in first["data"]]
    after = first["last_id"]
    while True:
        body = page(alice, chat_id, limit=2, after=after)
        seen += [m["id"] for m in body["data"]]
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert seen == ids


def test_backward_pages_are_unchanged_by_newer_messages(alice: Caller) -> None:
    chat_id, ids = numbered(alice, 5)
    first = page(alice, chat_id, limit=2, order="desc")
    saved(alice, chat_id, user("m6"), user("m7"))
    rest = page(alice, chat_id, limit=10, order="desc", after=first["last_id"])
    assert [m["id"] for m in rest["data"]] == [ids[2], ids[1], ids[0]]
    assert rest["has_more"] is False


def test_reading_while_another_client_writes_never_repeats_or_reorders(alice: Caller, service: str) -> None:
    chat_id, _ = numbered(alice, 10)
    stop = threading.Event()

    def writer() -> None:
        with httpx2.Client(base_url=service, headers={"authorization": f"Bearer {alice.key}"}, timeout=30) as http:
            n = 11
            while not stop.is_set():
                http.post(f"/api/v1/history/{chat_id}", json={"messages": [user(f"m{n}")]})
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: list[str] = []
        after = None
        for _ in range(30):
            body = page(alice, chat_id, limit=3, **({"after": after} if after else {}))
            seen += [m["content"] for m in body["data"]]
            if not body["has_more"]:
                break
            after = body["last_id"]
    finally:
        stop.set()
        thread.join()
    assert seen == [f"m{i}" for i in range(1, len(seen) + 1)]


@pytest.mark.parametrize("cursor", ["msg_nope", "", "chat_0123"], ids=["unknown", "empty", "wrong kind"])
def test_unknown_cursor_is_400_invalid_cursor(alice: Caller, cursor: str) -> None:
    chat_id, _ = numbered(alice, 2)
    response = alice.http.get(f"/api/v1/history/{chat_id}", params={"after": cursor})
    assert_error(response, 400, code="invalid_cursor", param="after")


def test_cursor_from_another_chat_is_400_invalid_cursor(alice: Caller) -> None:
    chat_id, _ = numbered(alice, 2)
    _, other_ids = numbered(alice, 2)
    response = alice.http.get(f"/api/v1/history/{chat_id}", params={"after": other_ids[0]})
    assert_error(response, 400, code="invalid_cursor", param="after")


def test_cursor_of_a_cleared_message_is_400_invalid_cursor(alice: Caller) -> None:
    chat_id, ids = numbered(alice, 3)
    assert alice.http.delete(f"/api/v1/history/{chat_id}").status_code == 200
    response = alice.http.get(f"/api/v1/history/{chat_id}", params={"after": ids[0]})
    assert_error(response, 400, code="invalid_cursor", param="after")


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"order": "up"}, {"after": "m" * 65}])
def test_bad_page_parameters_are_400(alice: Caller, params: dict[str, Any]) -> None:
    chat_id = alice.chat()["id"]
    response = alice.http.get(f"/api/v1/history/{chat_id}", params=params)
    assert_error(response, 400, code="invalid_value", param=next(iter(params)))


# --------------------------------------------------------------------------- saving


def test_save_stores_every_role_with_tool_calls_without_calling_the_model(
    alice: Caller, upstream: FakeUpstream
) -> None:
    chat_id = alice.chat()["id"]
    response = save(
        alice,
        chat_id,
        {"role": "system", "content": "Be terse.", "name": "setup"},
        {"role": "user", "content": "Weather in Paris and Oslo?", "name": "ann"},
        assistant(None, "call_a", "call_b"),
        tool("call_b", "-3C"),
        tool("call_a", "18C"),
        assistant("Paris 18C, Oslo -3C."),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    stored = body["data"]
    assert [(m["role"], m["content"], m["name"], m["tool_call_id"]) for m in stored] == [
        ("system", "Be terse.", "setup", None),
        ("user", "Weather in Paris and Oslo?", "ann", None),
        ("assistant", "", None, None),
        ("tool", "-3C", None, "call_b"),
        ("tool", "18C", None, "call_a"),
        ("assistant", "Paris 18C, Oslo -3C.", None, None),
    ]
    assert stored[2]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}},
    ]
    assert all(m["status"] == "complete" and m["chat_id"] == chat_id for m in stored)
    assert [m["parent_id"] for m in stored] == [None] + [m["id"] for m in stored[:-1]]
    assert (body["first_id"], body["last_id"], body["has_more"]) == (stored[0]["id"], stored[-1]["id"], False)
    assert page(alice, chat_id, limit=100)["data"] == stored
    assert alice.http.get(f"/api/v1/chats/{chat_id}").json()["message_count"] == 6
    assert upstream.requests == []


def test_save_appends_after_sent_messages(alice: Caller, upstream: FakeUpstream) -> None:
    chat_id = alice.chat()["id"]
    sent = alice.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "hi"}).json()
    more = saved(alice, chat_id, user("later"), assistant("noted"))
    assert contents(alice, chat_id) == ["hi", "Echo: hi", "later", "noted"]
    assert more[0]["parent_id"] == sent["assistant_message"]["id"]
    assert alice.http.get(f"/api/v1/chats/{chat_id}").json()["message_count"] == 4


def test_save_continues_the_current_branch(alice: Caller, upstream: FakeUpstream) -> None:
    chat_id = alice.chat()["id"]
    old = alice.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "q"}).json()["assistant_message"]
    upstream.queue_reply("better")
    new = alice.http.post(f"/api/v1/chats/{chat_id}/messages/{old['id']}/regenerate", json={}).json()
    stored = saved(alice, chat_id, user("thanks"))
    assert stored[0]["parent_id"] == new["assistant_message"]["id"]


def test_save_allocates_positions_after_next_seq(alice: Caller, database_url: str) -> None:
    chat_id, _ = numbered(alice, 3)
    saved(alice, chat_id, user("m4"))
    rows = fetch_rows(database_url, f"SELECT seq FROM messages WHERE chat_id = '{chat_id}' ORDER BY seq")
    assert [seq for (seq,) in rows] == [1, 2, 3, 4]
    assert fetch_rows(database_url, f"SELECT next_seq, message_count FROM chats WHERE id = '{chat_id}'") == [(5, 4)]


def test_tool_message_may_answer_a_call_saved_earlier(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    saved(alice, chat_id, user("q"), assistant(None, "call_1", "call_2"), tool("call_1", "one"))
    saved(alice, chat_id, tool("call_2", "two"), assistant("done"))
    assert contents(alice, chat_id) == ["q", "", "one", "two", "done"]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([tool("call_1", "x")], "messages.0.tool_call_id"),
        ([user("q"), tool("call_1", "x")], "messages.1.tool_call_id"),
        ([assistant(None, "call_1"), tool("call_2", "x")], "messages.1.tool_call_id"),
        ([assistant(None, "call_1"), tool("call_1", "x"), tool("call_1", "y")], "messages.2.tool_call_id"),
        ([assistant(None, "call_1", "call_2"), tool("call_1", "x"), user("next")], "messages.2"),
        ([assistant(None, "call_1"), user("between"), tool("call_1", "x")], "messages.1"),
    ],
    ids=["tool first", "after user", "unknown id", "answered twice", "unanswered call", "not adjacent"],
)
def test_save_out_of_order_tool_message_is_400_and_stores_nothing(
    alice: Caller, database_url: str, messages: list[dict[str, Any]], param: str
) -> None:
    chat_id, _ = numbered(alice, 1)
    response = save(alice, chat_id, *messages)
    assert_error(response, 400, code="invalid_message_order", param=param)
    assert contents(alice, chat_id) == ["m1"]
    assert fetch_rows(database_url, f"SELECT next_seq, message_count FROM chats WHERE id = '{chat_id}'") == [(2, 1)]


def test_save_checks_tool_messages_against_the_stored_chat(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    saved(alice, chat_id, assistant(None, "call_1"), tool("call_1", "x"))
    response = save(alice, chat_id, tool("call_1", "again"))
    assert_error(response, 400, code="invalid_message_order", param="messages.0.tool_call_id")


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "developer", "content": "x"}, "messages.0.role"),
        ({"role": "user"}, "messages.0"),
        ({"role": "user", "content": None}, "messages.0"),
        ({"role": "user", "content": "x", "tool_calls": assistant(None, "c")["tool_calls"]}, "messages.0"),
        ({"role": "assistant", "content": None}, "messages.0"),
        ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages.0"),
        ({"role": "tool", "content": "x"}, "messages.0"),
        ({"role": "user", "content": "x", "extra": 1}, "messages.0.extra"),
        ({"role": "user", "content": "a\u0000b"}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages.0"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "bad id", "function": {}}]}, None),
    ],
    ids=[
        "unknown role",
        "no content",
        "null content",
        "tool calls on user",
        "null content without calls",
        "tool_call_id on user",
        "tool without id",
        "unknown field",
        "NUL",
        "image part",
        "malformed call",
    ],
)
def test_save_invalid_message_is_400(alice: Caller, message: dict[str, Any], param: str | None) -> None:
    chat_id = alice.chat()["id"]
    response = alice.http.post(f"/api/v1/history/{chat_id}", json={"messages": [message]})
    if param is None:
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_value"
    else:
        assert_error(response, 400, code="invalid_value", param=param)
    assert contents(alice, chat_id) == []


def test_save_body_over_the_size_limit_is_413(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    response = save(alice, chat_id, user("x" * 1024 * 1024))
    assert_error(response, 413, code="request_too_large")
    assert contents(alice, chat_id) == []


def test_save_nothing_is_400(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    assert_error(save(alice, chat_id), 400, code="invalid_value", param="messages")


def test_save_more_than_1000_messages_at_once_is_400(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    response = save(alice, chat_id, *(user("x") for _ in range(1001)))
    assert_error(response, 400, code="invalid_value", param="messages")
    assert contents(alice, chat_id) == []


def test_text_parts_are_stored_as_one_string(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    parts = [{"type": "text", "text": "one, "}, {"type": "text", "text": "two"}]
    stored = saved(alice, chat_id, {"role": "user", "content": parts})
    assert stored[0]["content"] == "one, two"


def test_concurrent_saves_each_get_a_block_of_positions(alice: Caller, service: str, database_url: str) -> None:
    chat_id = alice.chat()["id"]
    writers, each = 6, 5
    results: list[int] = []

    def writer(w: int) -> None:
        with httpx2.Client(base_url=service, headers={"authorization": f"Bearer {alice.key}"}, timeout=60) as http:
            response = http.post(
                f"/api/v1/history/{chat_id}", json={"messages": [user(f"w{w}-{i}") for i in range(each)]}
            )
            results.append(response.status_code)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [201] * writers
    stored = [m["content"] for m in page(alice, chat_id, limit=100)["data"]]
    assert len(stored) == writers * each
    blocks = [stored[i : i + each] for i in range(0, len(stored), each)]
    assert sorted(blocks) == [[f"w{w}-{i}" for i in range(each)] for w in range(writers)]
    rows = fetch_rows(database_url, f"SELECT next_seq, message_count FROM chats WHERE id = '{chat_id}'")
    assert rows == [(writers * each + 1, writers * each)]


# --------------------------------------------------------------------------- clearing


def test_clear_deletes_the_messages_and_keeps_the_chat(alice: Caller, database_url: str) -> None:
    chat_id, _ = numbered(alice, 3)
    response = alice.http.delete(f"/api/v1/history/{chat_id}")
    assert response.status_code == 200
    assert response.json() == {
        "id": chat_id,
        "object": "chat.history.deleted",
        "deleted": True,
        "deleted_messages": 3,
    }
    chat = alice.http.get(f"/api/v1/chats/{chat_id}").json()
    assert (chat["title"], chat["message_count"]) == ("numbered", 0)
    assert page(alice, chat_id)["data"] == []
    assert fetch_rows(database_url, f"SELECT next_seq FROM chats WHERE id = '{chat_id}'") == [(4,)]


def test_messages_saved_after_a_clear_take_new_positions(alice: Caller, database_url: str) -> None:
    chat_id, _ = numbered(alice, 2)
    alice.http.delete(f"/api/v1/history/{chat_id}")
    stored = saved(alice, chat_id, user("fresh"))
    assert stored[0]["parent_id"] is None
    assert fetch_rows(database_url, f"SELECT seq FROM messages WHERE chat_id = '{chat_id}'") == [(3,)]
    assert contents(alice, chat_id) == ["fresh"]


def test_clear_removes_the_chats_summaries(alice: Caller, database_url: str) -> None:
    chat_id, _ = numbered(alice, 2)
    execute(
        database_url,
        "INSERT INTO chat_summaries (id, chat_id, up_to_seq, content, token_count, model, created_at) "
        f"VALUES ('sum_1', '{chat_id}', 2, 'm1 and m2', 3, 'gpt-4o-mini', CURRENT_TIMESTAMP)",
    )
    alice.http.delete(f"/api/v1/history/{chat_id}")
    assert fetch_rows(database_url, "SELECT id FROM chat_summaries") == []


def test_clear_an_empty_chat_deletes_nothing(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    assert alice.http.delete(f"/api/v1/history/{chat_id}").json()["deleted_messages"] == 0


# --------------------------------------------------------------------------- retention


def _purge(database_url: str, days: int, batch_size: int) -> PurgeResult:
    async def run() -> PurgeResult:
        engine = create_async_engine(database_url)
        try:
            return await purge_history(create_session_factory(engine), utcnow() - timedelta(days=days), batch_size)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _age(database_url: str, message_ids: list[str], days: int) -> None:
    when = (utcnow() - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S")
    ids = ", ".join(f"'{i}'" for i in message_ids)
    execute(database_url, f"UPDATE messages SET created_at = '{when}' WHERE id IN ({ids})")


def test_purge_deletes_only_old_messages_in_batches(alice: Caller, database_url: str) -> None:
    first, first_ids = numbered(alice, 4)
    second, second_ids = numbered(alice, 2)
    _age(database_url, first_ids[:3] + second_ids[:2], days=40)
    result = _purge(database_url, days=30, batch_size=2)
    assert result == PurgeResult(messages=5, batches=3)
    assert contents(alice, first) == ["m4"]
    assert contents(alice, second) == []
    assert alice.http.get(f"/api/v1/chats/{first}").json()["message_count"] == 1
    assert alice.http.get(f"/api/v1/chats/{second}").json()["message_count"] == 0


def test_purge_with_nothing_old_does_nothing(alice: Caller, database_url: str) -> None:
    chat_id, _ = numbered(alice, 2)
    assert _purge(database_url, days=1, batch_size=1000) == PurgeResult(messages=0, batches=0)
    assert contents(alice, chat_id) == ["m1", "m2"]


def test_purge_removes_old_messages_from_search(alice: Caller, database_url: str) -> None:
    chat_id = alice.chat()["id"]
    old = saved(alice, chat_id, user("ancient zebra"), user("recent zebra"))[0]
    _age(database_url, [old["id"]], days=40)
    _purge(database_url, days=30, batch_size=10)
    hits = alice.http.get("/api/v1/history/search", params={"q": "zebra"}).json()["data"]
    assert [hit["snippet"] for hit in hits] == ["recent **zebra**"]


def test_purge_removes_summaries_of_purged_messages(alice: Caller, database_url: str) -> None:
    chat_id, ids = numbered(alice, 3)
    for summary_id, up_to in (("sum_keep", 0), ("sum_old", 2)):
        execute(
            database_url,
            "INSERT INTO chat_summaries (id, chat_id, up_to_seq, content, token_count, model, created_at) "
            f"VALUES ('{summary_id}', '{chat_id}', {up_to}, 's', 1, 'gpt-4o-mini', CURRENT_TIMESTAMP)",
        )
    _age(database_url, ids[1:2], days=40)
    _purge(database_url, days=30, batch_size=10)
    assert fetch_rows(database_url, "SELECT id FROM chat_summaries") == [("sum_keep",)]


def test_purge_command_uses_the_service(alice: Caller, database_url: str) -> None:
    chat_id, ids = numbered(alice, 3)
    _age(database_url, ids[:2], days=10)
    env = {k: v for k, v in os.environ.items() if k not in ("HISTORY_RETENTION_DAYS",)}
    env |= {"DATABASE_URL": database_url, "LOG_LEVEL": "error"}
    done = subprocess.run(
        [sys.executable, "main.py", "purge", "--days", "7", "--batch", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "purged 2 messages older than 7 days in 2 batches\n"
    assert contents(alice, chat_id) == ["m3"]


def test_purge_command_without_days_is_an_error(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HISTORY_RETENTION_DAYS",)}
    env |= {"DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "main.py", "purge"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr == "openai_service: purge needs --days N or HISTORY_RETENTION_DAYS\n"


# --------------------------------------------------------------------------- isolation

Route = Callable[[httpx2.Client, str], httpx2.Response]

HISTORY_ROUTES: dict[str, Route] = {
    "GET history": lambda http, chat_id: http.get(f"/api/v1/history/{chat_id}"),
    "GET history desc": lambda http, chat_id: http.get(f"/api/v1/history/{chat_id}", params={"order": "desc"}),
    "POST history": lambda http, chat_id: http.post(f"/api/v1/history/{chat_id}", json={"messages": [user("bob")]}),
    "GET export json": lambda http, chat_id: http.get(f"/api/v1/history/{chat_id}/export"),
    "GET export markdown": lambda http, chat_id: http.get(
        f"/api/v1/history/{chat_id}/export", params={"format": "markdown"}
    ),
    "DELETE history": lambda http, chat_id: http.delete(f"/api/v1/history/{chat_id}"),
}


@pytest.fixture
def alices_chat(alice: Caller) -> str:
    chat_id: str = alice.chat(title="alice private")["id"]
    saved(alice, chat_id, user("alice secret words"), assistant("noted secret"))
    return chat_id


@pytest.mark.parametrize("route", HISTORY_ROUTES.values(), ids=HISTORY_ROUTES.keys())
def test_other_users_chat_is_404_like_a_missing_one(bob: Caller, alices_chat: str, route: Route) -> None:
    theirs = route(bob.http, alices_chat)
    assert_error(theirs, 404, code="not_found", param="chat_id", message=f"No chat found with id '{alices_chat}'.")
    missing = missing_chat_id()
    nobodys = route(bob.http, missing)
    assert theirs.text.replace(alices_chat, "<id>") == nobodys.text.replace(missing, "<id>")


@pytest.mark.parametrize("route", HISTORY_ROUTES.values(), ids=HISTORY_ROUTES.keys())
def test_other_users_attempt_leaves_the_history_unchanged(
    alice: Caller, bob: Caller, alices_chat: str, route: Route
) -> None:
    before = page(alice, alices_chat, limit=100)
    route(bob.http, alices_chat)
    assert page(alice, alices_chat, limit=100) == before
    assert alice.http.get(f"/api/v1/chats/{alices_chat}").json()["message_count"] == 2


def test_cursor_from_another_users_chat_is_400(alice: Caller, bob: Caller, alices_chat: str) -> None:
    alices_message = page(alice, alices_chat)["data"][0]["id"]
    bobs_chat, _ = numbered(bob, 1)
    response = bob.http.get(f"/api/v1/history/{bobs_chat}", params={"after": alices_message})
    assert_error(response, 400, code="invalid_cursor", param="after")


@pytest.mark.parametrize("route", HISTORY_ROUTES.values(), ids=HISTORY_ROUTES.keys())
def test_history_routes_need_a_key(service: str, alices_chat: str, route: Route) -> None:
    with httpx2.Client(base_url=service, timeout=30) as anonymous:
        assert_error(route(anonymous, alices_chat), 401, code="missing_api_key")
