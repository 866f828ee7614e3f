"""Full-text search: every word must match, user text is never query syntax, and nobody sees another's data."""

from typing import Any

import httpx2
import pytest

from tests.conftest import Caller
from tests.helpers import assert_error

CORPUS = [
    "discount 50% off today",
    "snake_case names are fine",
    'she said "hello" twice',
    "it's O'Brien again",
    "cats OR dogs",
    "wild*card matching",
    "the NEAR(a b) operator",
    "a AND b together",
    "café crème brûlée",
    "これは 日本語 です",
    "back\\slash path",
    "minus -sign here",
]


def search(caller: Caller, q: str, **params: Any) -> httpx2.Response:
    return caller.http.get("/api/v1/history/search", params={"q": q, **params})


def hits(caller: Caller, q: str, **params: Any) -> list[dict[str, Any]]:
    response = search(caller, q, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"object", "data", "has_more"}
    assert body["object"] == "list"
    data: list[dict[str, Any]] = body["data"]
    return data


def save(caller: Caller, chat_id: str, *contents: str, role: str = "user") -> list[dict[str, Any]]:
    response = caller.http.post(
        f"/api/v1/history/{chat_id}", json={"messages": [{"role": role, "content": c} for c in contents]}
    )
    assert response.status_code == 201, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


@pytest.fixture
def corpus(alice: Caller) -> dict[str, str]:
    """Alice's chat holding CORPUS; content -> message id."""
    chat_id = alice.chat(title="corpus")["id"]
    return {m["content"]: m["id"] for m in save(alice, chat_id, *CORPUS)}


def found(caller: Caller, q: str) -> list[str]:
    """The text of each message that matched, in order (snippet markers removed)."""
    return [hit["snippet"].replace("**", "") for hit in hits(caller, q) if hit["message_id"] is not None]


# --------------------------------------------------------------------------- matching


def test_a_hit_names_chat_message_role_snippet_score_and_time(alice: Caller) -> None:
    chat_id = alice.chat(title="greetings")["id"]
    message = save(alice, chat_id, "hello brave new world", role="assistant")[0]
    [hit] = hits(alice, "world")
    assert set(hit) == {"object", "chat_id", "message_id", "role", "snippet", "score", "created_at"}
    assert hit["object"] == "history.search_hit"
    assert (hit["chat_id"], hit["message_id"], hit["role"]) == (chat_id, message["id"], "assistant")
    assert hit["snippet"] == "hello brave new **world**"
    assert hit["created_at"] == message["created_at"]
    assert isinstance(hit["score"], float)
    assert hit["score"] > 0


def test_a_title_hit_has_no_message(alice: Caller) -> None:
    chat = alice.chat(title="Quarterly planning")
    [hit] = hits(alice, "planning")
    assert (hit["chat_id"], hit["message_id"], hit["role"]) == (chat["id"], None, None)
    assert hit["snippet"] == "Quarterly **planning**"
    assert hit["created_at"] == chat["created_at"]


def test_every_word_must_match(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    save(alice, chat_id, "red apple", "green apple", "red car")
    assert found(alice, "red apple") == ["red apple"]
    assert sorted(found(alice, "apple")) == ["green apple", "red apple"]
    assert found(alice, "red apple car") == []


def test_words_match_whole_and_ignore_case_and_accents(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    save(alice, chat_id, "Crème BRÛLÉE recipe")
    for q in ("creme", "CRÈME", "brulee", "Brûlée recipe"):
        assert found(alice, q) == ["Crème BRÛLÉE recipe"], q
    assert found(alice, "recip") == []


def test_more_occurrences_rank_first(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    once, thrice = save(alice, chat_id, "kiwi pear plum fig", "kiwi kiwi kiwi fig")
    ranked = hits(alice, "kiwi")
    assert [hit["message_id"] for hit in ranked] == [thrice["id"], once["id"]]
    assert ranked[0]["score"] > ranked[1]["score"]


def test_titles_and_messages_are_found_together(alice: Caller) -> None:
    chat = alice.chat(title="zebra facts")
    message = save(alice, chat["id"], "the zebra has stripes")[0]
    assert sorted((h["chat_id"], h["message_id"] or "") for h in hits(alice, "zebra")) == sorted(
        [(chat["id"], ""), (chat["id"], message["id"])]
    )


def test_limit_and_has_more(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    save(alice, chat_id, *(f"note number {i}" for i in range(5)))
    response = search(alice, "note", limit=3)
    assert len(response.json()["data"]) == 3
    assert response.json()["has_more"] is True
    response = search(alice, "note", limit=5)
    assert len(response.json()["data"]) == 5
    assert response.json()["has_more"] is False


def test_tool_calls_and_tool_results_are_searchable_by_content(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    response = alice.http.post(
        f"/api/v1/history/{chat_id}",
        json={
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny spell"},
            ]
        },
    )
    assert response.status_code == 201
    [hit] = hits(alice, "sunny")
    assert (hit["role"], hit["snippet"]) == ("tool", "**sunny** spell")


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("%", []),
        ("_", []),
        ('"', []),
        ("'", []),
        ("*", []),
        ("50%", ["discount 50% off today"]),
        ("%off", ["discount 50% off today"]),
        ("snake_case", ["snake_case names are fine"]),
        ('"hello"', ['she said "hello" twice']),
        ('"hello', ['she said "hello" twice']),
        ("O'Brien", ["it's O'Brien again"]),
        ("OR", ["cats OR dogs"]),
        ("cats OR fish", []),
        ("wil*", []),
        ("wild*", ["wild*card matching"]),
        ("NEAR(a b)", ["the NEAR(a b) operator"]),
        ("NEAR", ["the NEAR(a b) operator"]),
        ("a AND", ["a AND b together"]),
        ("AND", ["a AND b together"]),
        ("NOT", []),
        ("-sign", ["minus -sign here"]),
        ("-cats", ["cats OR dogs"]),
        ("dogs)", ["cats OR dogs"]),
        ("(dogs", ["cats OR dogs"]),
        ("{body}:cats", []),
        ("body:cats", []),
        ("owner:cats", []),
        ("^cats", ["cats OR dogs"]),
        ("cats:", ["cats OR dogs"]),
        ("café", ["café crème brûlée"]),
        ("日本語", ["これは 日本語 です"]),
        ("\\", []),
        ("back\\slash", ["back\\slash path"]),
        ("'; DROP TABLE messages; --", []),
    ],
)
def test_user_text_is_never_query_syntax(alice: Caller, corpus: dict[str, str], q: str, expected: list[str]) -> None:
    assert found(alice, q) == expected


@pytest.mark.parametrize("q", ["a\x00b", "\x00"])
def test_nul_in_the_query_is_400(alice: Caller, corpus: dict[str, str], q: str) -> None:
    assert_error(search(alice, q), 400, code="invalid_value", param="q")


@pytest.mark.parametrize("q", ["", "   ", "\t\n"], ids=["empty", "spaces", "whitespace"])
def test_empty_query_is_400(alice: Caller, q: str) -> None:
    assert_error(search(alice, q), 400, code="invalid_value", param="q")


def test_missing_query_is_400(alice: Caller) -> None:
    response = alice.http.get("/api/v1/history/search")
    assert_error(response, 400, code="invalid_value", param="q", message="Missing required parameter: 'q'.")


@pytest.mark.parametrize("params", [{"q": "x" * 257}, {"q": "x", "limit": 0}, {"q": "x", "limit": 51}])
def test_out_of_range_search_parameters_are_400(alice: Caller, params: dict[str, Any]) -> None:
    response = alice.http.get("/api/v1/history/search", params=params)
    assert_error(response, 400, code="invalid_value", param="q" if "limit" not in params else "limit")


def test_a_long_query_of_many_words_is_fine(alice: Caller, corpus: dict[str, str]) -> None:
    assert found(alice, " ".join(["cats"] * 50)) == ["cats OR dogs"]


# --------------------------------------------------------------------------- isolation and deletion


def test_search_never_returns_another_users_text(alice: Caller, bob: Caller) -> None:
    alices = alice.chat(title="alice aardvark plans")["id"]
    save(alice, alices, "alice aardvark secret")
    bobs = bob.chat(title="bob notes")["id"]
    bobs_message = save(bob, bobs, "bob aardvark sighting")[0]
    assert [(h["chat_id"], h["message_id"]) for h in hits(bob, "aardvark")] == [(bobs, bobs_message["id"])]
    assert hits(bob, "alice") == []
    assert hits(bob, "secret") == []
    assert hits(bob, "plans") == []
    assert {h["chat_id"] for h in hits(alice, "aardvark")} == {alices}


def test_searching_for_another_users_id_finds_nothing(alice: Caller, bob: Caller) -> None:
    save(alice, alice.chat()["id"], "anything at all")
    assert hits(bob, alice.user_id) == []
    assert hits(bob, alice.user_id.removeprefix("usr_")) == []
    assert hits(bob, "usr") == []


def test_cleared_messages_disappear_from_search(alice: Caller) -> None:
    chat_id = alice.chat(title="kept title")["id"]
    save(alice, chat_id, "ephemeral words")
    alice.http.delete(f"/api/v1/history/{chat_id}")
    assert hits(alice, "ephemeral") == []
    assert [h["message_id"] for h in hits(alice, "kept")] == [None]


def test_deleted_chats_disappear_from_search(alice: Caller) -> None:
    chat_id = alice.chat(title="doomed title")["id"]
    save(alice, chat_id, "doomed message")
    assert len(hits(alice, "doomed")) == 2
    assert alice.http.delete(f"/api/v1/chats/{chat_id}").status_code == 200
    assert hits(alice, "doomed") == []


def test_renamed_titles_are_searched_by_their_new_name(alice: Caller) -> None:
    chat_id = alice.chat(title="old name")["id"]
    alice.http.patch(f"/api/v1/chats/{chat_id}", json={"title": "fresh name"})
    assert hits(alice, "old") == []
    assert [h["snippet"] for h in hits(alice, "fresh")] == ["**fresh** name"]
    alice.http.patch(f"/api/v1/chats/{chat_id}", json={"title": None})
    assert hits(alice, "fresh") == []


def test_sent_messages_and_replies_are_searchable(alice: Caller) -> None:
    chat_id = alice.chat()["id"]
    alice.http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "quokka"})
    assert sorted((h["role"], h["snippet"]) for h in hits(alice, "quokka")) == [
        ("assistant", "Echo: **quokka**"),
        ("user", "**quokka**"),
    ]


def test_search_needs_a_key(service: str) -> None:
    with httpx2.Client(base_url=service, timeout=30) as anonymous:
        response = anonymous.get("/api/v1/history/search", params={"q": "x"})
    assert_error(response, 401, code="missing_api_key")
