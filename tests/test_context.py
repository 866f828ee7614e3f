"""Context management: exact token counts, strategies that never overflow, saved context, the dry run."""

from typing import Any

import httpx2

from app.services.tokens import Tokenizer
from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream

MODEL = "gpt-4o-mini"
SUMMARY_PROMPT_START = "You maintain a running summary"


def send(caller: Caller, chat_id: str, content: str) -> httpx2.Response:
    return caller.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": content})


def preview(caller: Caller, chat_id: str) -> dict[str, Any]:
    response = caller.http.get(f"/api/v1/chats/{chat_id}/context")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_each_message_stores_its_exact_token_count(alice: Caller) -> None:
    tokenizer = Tokenizer()
    chat = alice.chat()
    body = send(alice, chat["id"], "Count me exactly, please.").json()
    expected_user = tokenizer.count_message({"role": "user", "content": "Count me exactly, please."}, MODEL)
    expected_reply = tokenizer.count_message({"role": "assistant", "content": "Echo: Count me exactly, please."}, MODEL)
    assert body["user_message"]["tokens"] == expected_user
    assert body["assistant_message"]["tokens"] == expected_reply


def test_reply_records_its_context_which_equals_the_upstreams_prompt_count(alice: Caller) -> None:
    chat = alice.chat(system_prompt="Be brief.")
    send(alice, chat["id"], "first")
    reply = send(alice, chat["id"], "second").json()["assistant_message"]
    assert reply["context_messages"] == 4  # system, first, its reply, second
    assert reply["context_tokens"] == reply["usage"]["prompt_tokens"]


def test_window_never_exceeds_the_budget_and_drops_oldest_first(alice: Caller, upstream: FakeUpstream) -> None:
    budget = 120
    chat = alice.chat(system_prompt="You are a helpful assistant.", context={"max_context_tokens": budget})
    replies = [send(alice, chat["id"], f"message number {i} with a few words in it").json() for i in range(12)]
    prompts = [r["assistant_message"]["usage"]["prompt_tokens"] for r in replies]
    assert max(prompts) <= budget
    assert [r["assistant_message"]["context_tokens"] for r in replies] == prompts
    last = upstream.requests[-1].body["messages"]
    assert last[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert last[-1] == {"role": "user", "content": "message number 11 with a few words in it"}
    # The kept messages are the newest ones, contiguous, oldest dropped first.
    kept = [m["content"] for m in last[1:] if m["role"] == "user"]
    numbers = [int(c.split()[2]) for c in kept]
    assert numbers == list(range(12 - len(numbers), 12))
    assert len(numbers) < 12


def test_pinned_messages_and_system_prompt_are_never_dropped(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat(system_prompt="System rules.", context={"max_context_tokens": 100})
    first = send(alice, chat["id"], "remember the code word PINEAPPLE").json()["user_message"]
    pinned = alice.http.patch(f"/api/v1/chats/{chat['id']}/messages/{first['id']}", json={"pinned": True})
    assert pinned.status_code == 200
    assert pinned.json()["pinned"] is True
    for i in range(10):
        send(alice, chat["id"], f"filler message {i} to push older ones out")
    sent = upstream.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "System rules."}
    assert sent[1] == {"role": "user", "content": "remember the code word PINEAPPLE"}
    assert {"role": "assistant", "content": "Echo: remember the code word PINEAPPLE"} not in sent


def test_none_strategy_refuses_before_calling_upstream_and_keeps_nothing(alice: Caller, upstream: FakeUpstream) -> None:
    # "short one" and its reply fit in 30 tokens; with the next message the chat needs 37.
    chat = alice.chat(context={"strategy": "none", "max_context_tokens": 30})
    assert send(alice, chat["id"], "short one").status_code == 200
    calls = len(upstream.requests)
    response = send(alice, chat["id"], "this message makes the whole chat too long for its budget of thirty tokens")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert len(upstream.requests) == calls
    history = alice.http.get(f"/api/v1/history/{chat['id']}").json()["data"]
    assert [m["content"] for m in history] == ["short one", "Echo: short one"]


def test_a_message_larger_than_the_whole_budget_is_a_clear_400(alice: Caller, upstream: FakeUpstream) -> None:
    chat = alice.chat(context={"max_context_tokens": 50})
    response = send(alice, chat["id"], "word " * 100)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "content")
    assert "The newest message is" in error["message"]
    assert upstream.requests == []
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 0


def test_summary_strategy_folds_old_messages_and_reuses_the_summary(
    alice: Caller, upstream: FakeUpstream, database_url: str
) -> None:
    chat = alice.chat(context={"strategy": "summary", "max_context_tokens": 110})
    # Each turn adds 32 prompt tokens: 18, 50, 82 fit in 110; the fourth turn (114) does not.
    for i in range(3):
        send(alice, chat["id"], f"fact number {i}: the sky is colour {i}")
    assert len(upstream.requests) == 3
    upstream.queue_reply("The sky had colours 0 and 1.")  # the summary call comes first
    reply = send(alice, chat["id"], "fact number 3: the sky is colour 3").json()["assistant_message"]
    summary_call, main_call = upstream.requests[3:]
    assert summary_call.body["messages"][0]["content"].startswith(SUMMARY_PROMPT_START)
    # Room is left for the summary (a quarter of the budget, 27 tokens) beside the window,
    # so one call folds the oldest messages: the first turn and the next question.
    assert summary_call.body["messages"][1]["content"] == (
        "New messages:\n"
        "[user] fact number 0: the sky is colour 0\n"
        "[assistant] Echo: fact number 0: the sky is colour 0\n"
        "[user] fact number 1: the sky is colour 1"
    )
    assert summary_call.body["max_completion_tokens"] == 27
    summary_message = {
        "role": "system",
        "content": "Summary of the earlier conversation:\nThe sky had colours 0 and 1.",
    }
    assert main_call.body["messages"][0] == summary_message
    assert main_call.body["messages"][1] == {"role": "assistant", "content": "Echo: fact number 1: the sky is colour 1"}
    assert reply["usage"]["prompt_tokens"] == reply["context_tokens"] <= 110
    view = preview(alice, chat["id"])
    assert view["summary"]["up_to_seq"] == 3
    assert view["messages"][0]["kind"] == "summary"

    # The next turn fits beside the same summary: it is reused, not rewritten.
    send(alice, chat["id"], "short")
    assert len(upstream.requests) == 6
    assert upstream.requests[5].body["messages"][0] == summary_message
    # The summary's upstream call is in the ledger like any other.
    stats = alice.http.get("/api/v1/stats/summary").json()
    assert stats["requests"] == 6
    assert stats["input_tokens"] == upstream.totals.prompt_tokens


def test_saved_context_and_chat_instructions_follow_the_system_prompt(alice: Caller, upstream: FakeUpstream) -> None:
    put = alice.http.put("/api/v1/me/context", json={"content": "My name is Alice."})
    assert (put.status_code, put.json()["content"]) == (200, "My name is Alice.")
    assert alice.http.get("/api/v1/me/context").json()["content"] == "My name is Alice."
    chat = alice.chat(system_prompt="Be kind.", instructions="Answer in French.")
    send(alice, chat["id"], "hello")
    assert upstream.requests[-1].body["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "system", "content": "My name is Alice."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hello"},
    ]
    kinds = [m["kind"] for m in preview(alice, chat["id"])["messages"]]
    assert kinds == ["system", "user_context", "instructions", "message", "message"]


def test_saved_context_is_per_user(alice: Caller, bob: Caller) -> None:
    alice.http.put("/api/v1/me/context", json={"content": "Alice's facts"})
    assert bob.http.get("/api/v1/me/context").json() == {"object": "user.context", "content": "", "updated_at": None}


def test_dry_run_shows_every_part_with_tokens_and_what_was_dropped(alice: Caller) -> None:
    tokenizer = Tokenizer()
    chat = alice.chat(system_prompt="Sys.", context={"max_context_tokens": 80, "reserve_tokens": 100})
    for i in range(8):
        send(alice, chat["id"], f"number {i} here")
    view = preview(alice, chat["id"])
    assert view["object"] == "chat.context"
    assert view["model"] == MODEL
    assert view["exact"] is True
    assert view["budget"] == {
        "context_window": 128000,
        "reserve_tokens": 100,
        "safety_margin": 64,
        "max_context_tokens": 80,
    }
    assert view["messages"][0] == {
        "kind": "system",
        "message_id": None,
        "role": "system",
        "tokens": tokenizer.count_message({"role": "system", "content": "Sys."}, MODEL),
        "pinned": False,
    }
    assert view["total_tokens"] == sum(m["tokens"] for m in view["messages"]) + 3
    assert view["total_tokens"] <= 80
    kept = len(view["messages"]) - 1
    assert view["dropped"]["reason"] == "window"
    assert view["dropped"]["messages"] == 16 - kept


def test_context_settings_are_validated_and_shown(alice: Caller) -> None:
    bad = alice.http.post("/api/v1/chats", json={"context": {"strategy": "everything"}})
    assert bad.status_code == 400
    chat = alice.chat(context={"strategy": "summary", "reserve_tokens": 500})
    assert chat["context"] == {"strategy": "summary", "max_context_tokens": None, "reserve_tokens": 500}
    patched = alice.http.patch(f"/api/v1/chats/{chat['id']}", json={"context": {"strategy": "none"}}).json()
    assert patched["context"] == {"strategy": "none", "max_context_tokens": None, "reserve_tokens": None}
    default = alice.chat()
    assert default["context"]["strategy"] == "window"


def test_pinning_another_users_message_is_404(alice: Caller, bob: Caller) -> None:
    chat = alice.chat()
    message = send(alice, chat["id"], "mine").json()["user_message"]
    response = bob.http.patch(f"/api/v1/chats/{chat['id']}/messages/{message['id']}", json={"pinned": True})
    assert response.status_code == 404
    assert bob.http.get(f"/api/v1/chats/{chat['id']}/context").status_code == 404
