"""One user's chats are invisible to another: every route answers exactly as for a chat that does not exist."""

from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import assert_error, missing_chat_id

Request = Callable[[httpx2.Client, str], httpx2.Response]

CHAT_ROUTES: dict[str, Request] = {
    "GET chat": lambda http, chat_id: http.get(f"/api/v1/chats/{chat_id}"),
    "PATCH chat": lambda http, chat_id: http.patch(f"/api/v1/chats/{chat_id}", json={"title": "bob was here"}),
    "DELETE chat": lambda http, chat_id: http.delete(f"/api/v1/chats/{chat_id}"),
    "POST message": lambda http, chat_id: http.post(f"/api/v1/chats/{chat_id}/messages", json={"content": "hi"}),
    "POST message stream": lambda http, chat_id: http.post(
        f"/api/v1/chats/{chat_id}/messages", json={"content": "hi", "stream": True}
    ),
    "GET history": lambda http, chat_id: http.get(f"/api/v1/history/{chat_id}"),
}


@pytest.fixture
def alices_chat(alice: Caller) -> dict[str, Any]:
    """Alice's chat with one exchange in it, as she reads it."""
    chat = alice.chat(title="alice's secrets", tags=["private"], metadata={"k": "v"})
    response = alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "my secret"})
    assert response.status_code == 200, response.text
    current: dict[str, Any] = alice.http.get(f"/api/v1/chats/{chat['id']}").json()
    assert current["message_count"] == 2
    return current


def _history(caller: Caller, chat_id: str) -> Any:
    response = caller.http.get(f"/api/v1/history/{chat_id}")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("route", CHAT_ROUTES.values(), ids=CHAT_ROUTES.keys())
def test_other_users_chat_is_404(bob: Caller, alices_chat: dict[str, Any], route: Request) -> None:
    response = route(bob.http, alices_chat["id"])
    assert_error(
        response, 404, code="not_found", param="chat_id", message=f"No chat found with id '{alices_chat['id']}'."
    )


@pytest.mark.parametrize("route", CHAT_ROUTES.values(), ids=CHAT_ROUTES.keys())
def test_other_users_chat_answers_exactly_like_a_missing_chat(
    bob: Caller, alices_chat: dict[str, Any], route: Request
) -> None:
    missing = missing_chat_id()
    theirs = route(bob.http, alices_chat["id"])
    nobodys = route(bob.http, missing)
    assert theirs.status_code == nobodys.status_code
    assert theirs.headers["content-type"] == nobodys.headers["content-type"]
    assert theirs.text.replace(alices_chat["id"], "<id>") == nobodys.text.replace(missing, "<id>")


@pytest.mark.parametrize("route", CHAT_ROUTES.values(), ids=CHAT_ROUTES.keys())
def test_other_users_attempt_leaves_the_chat_unchanged(
    alice: Caller, bob: Caller, alices_chat: dict[str, Any], route: Request
) -> None:
    history = _history(alice, alices_chat["id"])
    route(bob.http, alices_chat["id"])
    assert alice.http.get(f"/api/v1/chats/{alices_chat['id']}").json() == alices_chat
    assert _history(alice, alices_chat["id"]) == history


@pytest.mark.parametrize(
    "route",
    [CHAT_ROUTES["POST message"], CHAT_ROUTES["POST message stream"]],
    ids=["stream false", "stream true"],
)
def test_other_users_send_never_reaches_the_model(
    bob: Caller, alices_chat: dict[str, Any], upstream: FakeUpstream, route: Request
) -> None:
    upstream.reset()
    route(bob.http, alices_chat["id"])
    assert upstream.requests == []


def test_other_users_chats_are_not_listed(alice: Caller, bob: Caller, alices_chat: dict[str, Any]) -> None:
    mine = bob.chat(title="bob's")
    page = bob.http.get("/api/v1/chats").json()
    assert [chat["id"] for chat in page["data"]] == [mine["id"]]
    assert [chat["id"] for chat in alice.http.get("/api/v1/chats").json()["data"]] == [alices_chat["id"]]


@pytest.mark.parametrize(
    "params",
    [{}, {"q": "secrets"}, {"tag": "private"}, {"archived": "false"}, {"pinned": "false"}, {"order": "asc"}],
    ids=["all", "q", "tag", "archived", "pinned", "asc"],
)
def test_other_users_chats_are_not_found_by_filters(
    bob: Caller, alices_chat: dict[str, Any], params: dict[str, str]
) -> None:
    page = bob.http.get("/api/v1/chats", params=params).json()
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_other_users_chat_id_is_rejected_as_cursor(bob: Caller, alices_chat: dict[str, Any]) -> None:
    bob.chat()
    response = bob.http.get("/api/v1/chats", params={"after": alices_chat["id"]})
    assert_error(
        response,
        400,
        code="invalid_cursor",
        param="after",
        message=f"No such object for cursor 'after': '{alices_chat['id']}'.",
    )


def test_other_users_message_id_is_rejected_as_history_cursor(
    alice: Caller, bob: Caller, alices_chat: dict[str, Any]
) -> None:
    alice_message = _history(alice, alices_chat["id"])["data"][0]["id"]
    chat = bob.chat()
    response = bob.http.get(f"/api/v1/history/{chat['id']}", params={"after": alice_message})
    assert_error(response, 400, code="invalid_cursor", param="after")


def test_message_id_of_another_chat_is_rejected_as_history_cursor(alice: Caller, alices_chat: dict[str, Any]) -> None:
    other = alice.chat()
    message = _history(alice, alices_chat["id"])["data"][0]["id"]
    response = alice.http.get(f"/api/v1/history/{other['id']}", params={"after": message})
    assert_error(response, 400, code="invalid_cursor", param="after")


# Bodies that pass validation on routes whose body is required; others get `{}` (or none for GET and DELETE).
KNOWN_BODIES: dict[tuple[str, str], Any] = {
    ("PATCH", "/api/v1/chats/{chat_id}"): {"title": "bob was here"},
    ("POST", "/api/v1/chats/{chat_id}/messages"): {"content": "hi"},
    ("PATCH", "/api/v1/chats/{chat_id}/messages/{message_id}"): {"content": "bob was here"},
    ("POST", "/api/v1/history/{chat_id}"): {"messages": [{"role": "user", "content": "bob was here"}]},
}


def _schema_chat_routes(caller: Caller) -> list[tuple[str, str]]:
    schema = caller.http.get("/openapi.json").json()
    return sorted(
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        if "{chat_id}" in path
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    )


def test_every_chat_route_in_the_schema_hides_other_users_chats(
    alice: Caller, bob: Caller, alices_chat: dict[str, Any]
) -> None:
    routes = _schema_chat_routes(bob)
    assert {
        ("GET", "/api/v1/chats/{chat_id}"),
        ("PATCH", "/api/v1/chats/{chat_id}"),
        ("DELETE", "/api/v1/chats/{chat_id}"),
        ("POST", "/api/v1/chats/{chat_id}/messages"),
        ("GET", "/api/v1/history/{chat_id}"),
    } <= set(routes)
    message_id = _history(alice, alices_chat["id"])["data"][0]["id"]
    history = _history(alice, alices_chat["id"])
    missing = missing_chat_id()
    leaks = []
    for method, path in routes:
        body = KNOWN_BODIES.get((method, path), None if method in ("GET", "DELETE") else {})
        answers = []
        for chat_id in (alices_chat["id"], missing):
            url = path.replace("{chat_id}", chat_id).replace("{message_id}", message_id)
            response = bob.http.request(method, url, json=body)
            answers.append((response.status_code, response.text.replace(chat_id, "<id>")))
        if answers[0] != answers[1] or answers[0][0] < 400:
            leaks.append((method, path, answers))
    assert leaks == []
    assert alice.http.get(f"/api/v1/chats/{alices_chat['id']}").json() == alices_chat
    assert _history(alice, alices_chat["id"]) == history
