"""Branches: regenerating a reply and editing a message make siblings, never overwrites."""

from typing import Any

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.sse import collect


def send(caller: Caller, chat_id: str, content: str) -> dict[str, Any]:
    response = caller.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": content})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def all_messages(caller: Caller, chat_id: str) -> dict[str, dict[str, Any]]:
    data = caller.http.get(f"/api/v1/history/{chat_id}", params={"limit": 100, "branch": "all"})
    assert data.status_code == 200, data.text
    return {m["id"]: m for m in data.json()["data"]}


def history(caller: Caller, chat_id: str, **params: str) -> list[str]:
    data = caller.http.get(f"/api/v1/history/{chat_id}", params={"limit": 100, **params})
    assert data.status_code == 200, data.text
    return [m["content"] for m in data.json()["data"]]


def test_regenerate_makes_a_sibling_reply_and_takes_the_old_one_off_the_branch(
    alice: Caller, upstream: FakeUpstream
) -> None:
    chat = alice.chat()
    first = send(alice, chat["id"], "question")
    old_reply = first["assistant_message"]
    upstream.queue_reply("a better answer")
    response = alice.http.post(f"/api/v1/chats/{chat['id']}/messages/{old_reply['id']}/regenerate", json={})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_message"]["id"] == first["user_message"]["id"]
    new_reply = body["assistant_message"]
    assert (new_reply["content"], new_reply["parent_id"], new_reply["active"]) == (
        "a better answer",
        first["user_message"]["id"],
        True,
    )
    # The regeneration was asked with the same context as the first reply: just the question.
    assert upstream.requests[-1].body["messages"] == [{"role": "user", "content": "question"}]
    stored = all_messages(alice, chat["id"])
    assert stored[old_reply["id"]]["active"] is False
    assert stored[old_reply["id"]]["content"] == "Echo: question"
    # The next send builds on the new reply only.
    send(alice, chat["id"], "follow-up")
    assert upstream.requests[-1].body["messages"] == [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "a better answer"},
        {"role": "user", "content": "follow-up"},
    ]


def test_regenerate_can_stream(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat()
    old = send(alice, chat["id"], "hi")["assistant_message"]
    got = collect(alice.http, f"/api/v1/chats/{chat['id']}/messages/{old['id']}/regenerate", {"stream": True})
    assert [kind for kind, _ in got][-2:] == ["message.completed", "done"]
    assert got[-2][1]["message"]["content"] == "Echo: hi"
    assert got[-2][1]["message"]["parent_id"] == old["parent_id"]


def test_editing_a_user_message_with_reply_forks_the_chat(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat()
    first = send(alice, chat["id"], "one")
    second = send(alice, chat["id"], "two")
    response = alice.http.patch(
        f"/api/v1/chats/{chat['id']}/messages/{first['user_message']['id']}", json={"content": "uno", "reply": True}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_message"]["content"] == "uno"
    assert body["user_message"]["parent_id"] is None  # a sibling of "one"
    assert body["assistant_message"]["content"] == "Echo: uno"
    assert upstream.requests[-1].body["messages"] == [{"role": "user", "content": "uno"}]
    stored = all_messages(alice, chat["id"])
    off = [first["user_message"], first["assistant_message"], second["user_message"], second["assistant_message"]]
    assert [stored[m["id"]]["active"] for m in off] == [False, False, False, False]
    assert len(stored) == 6


def test_editing_without_reply_stores_the_sibling_only(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat()
    first = send(alice, chat["id"], "draft")["user_message"]
    calls = len(upstream.requests)
    response = alice.http.patch(f"/api/v1/chats/{chat['id']}/messages/{first['id']}", json={"content": "final"})
    assert response.status_code == 200
    edited = response.json()
    assert (edited["object"], edited["content"], edited["parent_id"], edited["active"]) == (
        "chat.message",
        "final",
        None,
        True,
    )
    assert len(upstream.requests) == calls
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 3


def test_only_replies_regenerate_and_only_user_messages_take_new_content(alice: Caller) -> None:
    chat = alice.chat()
    turn = send(alice, chat["id"], "x")
    user_id, reply_id = turn["user_message"]["id"], turn["assistant_message"]["id"]
    wrong = alice.http.post(f"/api/v1/chats/{chat['id']}/messages/{user_id}/regenerate", json={})
    assert (wrong.status_code, wrong.json()["error"]["param"]) == (400, "message_id")
    edit = alice.http.patch(f"/api/v1/chats/{chat['id']}/messages/{reply_id}", json={"content": "rewritten"})
    assert edit.status_code == 400
    alice.http.post(f"/api/v1/chats/{chat['id']}/messages/{reply_id}/regenerate", json={})
    stale = alice.http.post(f"/api/v1/chats/{chat['id']}/messages/{reply_id}/regenerate", json={})
    assert (stale.status_code, stale.json()["error"]["code"]) == (400, "not_on_current_branch")


def test_another_users_message_cannot_be_regenerated_or_edited(alice: Caller, bob: Caller) -> None:
    chat = alice.chat()
    turn = send(alice, chat["id"], "mine")
    reply = turn["assistant_message"]["id"]
    assert bob.http.post(f"/api/v1/chats/{chat['id']}/messages/{reply}/regenerate", json={}).status_code == 404
    user = turn["user_message"]["id"]
    patched = bob.http.patch(f"/api/v1/chats/{chat['id']}/messages/{user}", json={"content": "hijack"})
    assert patched.status_code == 404
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 2


def test_history_reads_the_current_branch_or_any_other(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat()
    first = send(alice, chat["id"], "one")
    send(alice, chat["id"], "two")
    upstream.queue_reply("another take")
    alice.http.post(f"/api/v1/chats/{chat['id']}/messages/{first['assistant_message']['id']}/regenerate", json={})
    assert history(alice, chat["id"]) == ["one", "another take"]
    old_leaf = first["assistant_message"]["id"]
    assert history(alice, chat["id"], branch=old_leaf) == ["one", "Echo: one"]
    assert history(alice, chat["id"], branch="all") == ["one", "Echo: one", "two", "Echo: two", "another take"]
    unknown = alice.http.get(f"/api/v1/history/{chat['id']}", params={"branch": "msg_nope"})
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "branch")


def test_another_users_branch_read_is_404(alice: Caller, bob: Caller) -> None:
    chat = alice.chat()
    leaf = send(alice, chat["id"], "mine")["assistant_message"]["id"]
    assert bob.http.get(f"/api/v1/history/{chat['id']}", params={"branch": leaf}).status_code == 404
