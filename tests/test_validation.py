"""Bad input is a 400 (or 413) in OpenAI's error shape, never a 500; good Unicode round-trips exactly."""

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest

from tests.conftest import Caller
from tests.helpers import assert_error, missing_chat_id

ONE_MIB = 1024 * 1024

Request = Callable[[Caller, str], httpx2.Response]


@pytest.fixture
def chat_id(alice: Caller) -> str:
    chat_id: str = alice.chat(title="t")["id"]
    return chat_id


def _send(caller: Caller, chat_id: str, **fields: Any) -> httpx2.Response:
    return caller.http.post(f"/api/v1/chats/{chat_id}/messages", json=fields)


def _raw(caller: Caller, method: str, path: str, body: bytes) -> httpx2.Response:
    return caller.http.request(method, path, content=body, headers={"content-type": "application/json"})


def _history(caller: Caller, chat_id: str) -> list[dict[str, Any]]:
    response = caller.http.get(f"/api/v1/history/{chat_id}")
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def _no_key(caller: Caller, path: str) -> httpx2.Response:
    request = caller.http.build_request("GET", path)
    del request.headers["authorization"]
    return caller.http.send(request)


ERRORS: dict[str, tuple[int, Request]] = {
    "401 no key": (401, lambda c, chat: _no_key(c, "/api/v1/chats")),
    "403 admin only": (403, lambda c, chat: c.http.get("/api/v1/users")),
    "404 route": (404, lambda c, chat: c.http.get("/api/v1/nothing-here")),
    "404 chat": (404, lambda c, chat: c.http.get(f"/api/v1/chats/{missing_chat_id()}")),
    "405 method": (405, lambda c, chat: c.http.put("/api/v1/chats")),
    "400 body": (400, lambda c, chat: c.http.post("/api/v1/chats", json={"title": 5})),
    "400 query": (400, lambda c, chat: c.http.get("/api/v1/chats", params={"limit": "x"})),
    "400 json": (400, lambda c, chat: _raw(c, "POST", "/api/v1/chats", b"{")),
    "400 missing": (400, lambda c, chat: _send(c, chat, stream=False)),
    "400 cursor": (400, lambda c, chat: c.http.get("/api/v1/chats", params={"after": "chat_nope"})),
    "400 surrogate": (400, lambda c, chat: _raw(c, "POST", "/api/v1/chats", b'{"title": "\\ud800"}')),
    "413 size": (413, lambda c, chat: _send(c, chat, content="x" * ONE_MIB)),
}


# --------------------------------------------------------------------------- the error shape


@pytest.mark.parametrize(("status", "request_"), ERRORS.values(), ids=ERRORS.keys())
def test_every_error_has_exactly_the_openai_shape(alice: Caller, chat_id: str, status: int, request_: Request) -> None:
    response = request_(alice, chat_id)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("status", "request_"), ERRORS.values(), ids=ERRORS.keys())
def test_every_error_carries_a_request_id(alice: Caller, chat_id: str, status: int, request_: Request) -> None:
    response = request_(alice, chat_id)
    assert response.status_code == status
    assert re.fullmatch(r"req_[0-9a-f]{24}", response.headers["x-request-id"])


# --------------------------------------------------------------------------- types and required fields


def test_title_of_wrong_type_is_400_naming_title(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"title": 5})
    assert_error(
        response,
        400,
        code="invalid_value",
        param="title",
        message="Invalid value for 'title': Input should be a valid string.",
    )


def test_stream_of_wrong_type_is_400_naming_stream(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="hi", stream="yes")
    assert_error(response, 400, code="invalid_value", param="stream")
    assert _history(alice, chat_id) == []


def test_stream_as_number_is_400_naming_stream(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="hi", stream=1)
    assert_error(response, 400, code="invalid_value", param="stream")


def test_content_of_wrong_type_is_400_naming_content(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content=["hi"])
    assert_error(response, 400, code="invalid_value", param="content")


def test_missing_content_is_400_missing_required_parameter(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id)
    assert_error(response, 400, code="invalid_value", param="content", message="Missing required parameter: 'content'.")


def test_empty_content_is_400(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="")
    assert_error(response, 400, code="invalid_value", param="content")
    assert _history(alice, chat_id) == []


def test_nested_param_of_wrong_type_is_400_naming_its_path(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="hi", params={"max_tokens": "many"})
    assert_error(response, 400, code="invalid_value", param="params.max_tokens")


def test_body_that_is_not_an_object_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json=["title"])
    assert_error(response, 400, code="invalid_value")


def test_invalid_json_is_400(alice: Caller) -> None:
    response = _raw(alice, "POST", "/api/v1/chats", b'{"title": "unterminated')
    assert_error(response, 400, code="invalid_value", message="We could not parse the JSON body of your request.")


def test_invalid_json_on_send_is_400_and_stores_nothing(alice: Caller, chat_id: str) -> None:
    response = _raw(alice, "POST", f"/api/v1/chats/{chat_id}/messages", b'{"content": hi}')
    assert_error(response, 400, code="invalid_value", message="We could not parse the JSON body of your request.")
    assert _history(alice, chat_id) == []


def test_unknown_field_in_send_is_400(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="hi", temperature=1)
    assert_error(response, 400, code="invalid_value", param="temperature")


# --------------------------------------------------------------------------- size


def test_body_over_one_mib_with_content_length_is_413(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="x" * ONE_MIB)
    assert_error(
        response,
        413,
        code="request_too_large",
        message=f"Request body is larger than the limit of {ONE_MIB} bytes.",
    )
    assert _history(alice, chat_id) == []


def _padded(body: bytes, size: int) -> bytes:
    """A JSON body of exactly `size` bytes: `body` followed by insignificant whitespace."""
    return body + b" " * (size - len(body))


def _chunks(body: bytes, size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    padded = _padded(body, size)
    for start in range(0, len(padded), chunk):
        yield padded[start : start + chunk]


def test_body_of_exactly_one_mib_is_accepted(alice: Caller, chat_id: str) -> None:
    response = _raw(alice, "PATCH", f"/api/v1/chats/{chat_id}", _padded(b'{"title": "padded"}', ONE_MIB))
    assert response.status_code == 200, response.text
    assert response.json()["title"] == "padded"


def test_body_one_byte_over_one_mib_is_413(alice: Caller, chat_id: str) -> None:
    response = _raw(alice, "PATCH", f"/api/v1/chats/{chat_id}", _padded(b'{"title": "padded"}', ONE_MIB + 1))
    assert_error(response, 413, code="request_too_large")
    assert alice.http.get(f"/api/v1/chats/{chat_id}").json()["title"] == "t"


def test_body_over_one_mib_sent_chunked_is_413(alice: Caller) -> None:
    response = alice.http.post(
        "/api/v1/chats",
        content=_chunks(b'{"title": "chunked"}', ONE_MIB + 64 * 1024),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(
        response,
        413,
        code="request_too_large",
        message=f"Request body is larger than the limit of {ONE_MIB} bytes.",
    )
    assert alice.http.get("/api/v1/chats").json()["data"] == []


def test_body_of_one_mib_sent_chunked_is_accepted(alice: Caller) -> None:
    response = alice.http.post(
        "/api/v1/chats",
        content=_chunks(b'{"title": "chunked"}', ONE_MIB),
        headers={"content-type": "application/json"},
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "chunked"


# --------------------------------------------------------------------------- text that cannot be stored


def test_nul_in_content_is_400(alice: Caller, chat_id: str) -> None:
    response = _send(alice, chat_id, content="a\x00b")
    assert_error(response, 400, code="invalid_value", param="content")
    assert _history(alice, chat_id) == []


def test_nul_in_title_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"title": "a\x00b"})
    assert_error(response, 400, code="invalid_value", param="title")


def test_nul_in_title_update_is_400(alice: Caller, chat_id: str) -> None:
    response = alice.http.patch(f"/api/v1/chats/{chat_id}", json={"title": "\x00"})
    assert_error(response, 400, code="invalid_value", param="title")
    assert alice.http.get(f"/api/v1/chats/{chat_id}").json()["title"] == "t"


def test_nul_in_metadata_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"metadata": {"k": "v\x00"}})
    assert_error(response, 400, code="invalid_value", param="metadata.k")


def test_nul_in_query_is_400(alice: Caller) -> None:
    response = alice.http.get("/api/v1/chats", params={"q": "a\x00b"})
    assert_error(response, 400, code="invalid_value", param="q")


def test_lone_surrogate_in_content_is_400(alice: Caller, chat_id: str) -> None:
    response = _raw(alice, "POST", f"/api/v1/chats/{chat_id}/messages", b'{"content": "\\ud800"}')
    assert_error(response, 400, code="invalid_value", param="content")
    assert _history(alice, chat_id) == []


def test_lone_surrogate_in_title_is_400(alice: Caller) -> None:
    response = _raw(alice, "POST", "/api/v1/chats", b'{"title": "x\\udfff"}')
    assert_error(response, 400, code="invalid_value", param="title")


def test_escaped_surrogate_pair_is_decoded_and_stored(alice: Caller, chat_id: str) -> None:
    response = _raw(alice, "POST", f"/api/v1/chats/{chat_id}/messages", b'{"content": "\\ud83d\\ude00"}')
    assert response.status_code == 200, response.text
    assert _history(alice, chat_id)[0]["content"] == "\U0001f600"


def test_body_that_is_not_utf8_is_400(alice: Caller) -> None:
    response = _raw(alice, "POST", "/api/v1/chats", b'{"title": "\xff\xfe"}')
    assert_error(response, 400, code="invalid_value")


# --------------------------------------------------------------------------- Unicode round trips

UNICODE = {
    "emoji": "Hello 👋🏽 family: 👨‍👩‍👧‍👦 flag: 🇳🇴",
    "rtl": "שלום עולם, مرحبا بالعالم",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0337\u0321",
    "four-byte": "\U0001d11e music, \U00020000 CJK ext B, \U0001f600",
    "mixed": "Grüße, 東京, ÅNGSTRÖM, zero\u200bwidth, bidi \u202eoverride\u202c",
}


@pytest.mark.parametrize("text", UNICODE.values(), ids=UNICODE.keys())
def test_unicode_title_is_stored_verbatim(alice: Caller, text: str) -> None:
    chat = alice.chat(title=text)
    assert chat["title"] == text
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["title"] == text


@pytest.mark.parametrize("text", UNICODE.values(), ids=UNICODE.keys())
def test_unicode_content_is_stored_and_returned_verbatim(alice: Caller, chat_id: str, text: str) -> None:
    response = _send(alice, chat_id, content=text)
    assert response.status_code == 200, response.text
    assert response.json()["user_message"]["content"] == text
    history = _history(alice, chat_id)
    assert [(m["role"], m["content"]) for m in history] == [("user", text), ("assistant", "Echo: " + text)]


def test_unicode_is_not_normalized(alice: Caller, chat_id: str) -> None:
    decomposed, composed = "e\u0301", "\u00e9"
    assert _send(alice, chat_id, content=decomposed).status_code == 200
    assert _send(alice, chat_id, content=composed).status_code == 200
    assert [m["content"] for m in _history(alice, chat_id) if m["role"] == "user"] == [decomposed, composed]


def test_unicode_in_metadata_and_tags_is_stored_verbatim(alice: Caller) -> None:
    chat = alice.chat(metadata={"ключ": "値 👋"}, tags=["שלום", "\U0001f600"])
    again = alice.http.get(f"/api/v1/chats/{chat['id']}").json()
    assert (again["metadata"], again["tags"]) == ({"ключ": "値 👋"}, ["שלום", "\U0001f600"])


# --------------------------------------------------------------------------- routes and methods


def test_unknown_route_is_404_in_openai_shape(alice: Caller) -> None:
    response = alice.http.get("/api/v1/nothing-here")
    assert_error(response, 404, code="not_found", message="Not Found")


def test_unknown_route_without_a_key_is_404_in_openai_shape(alice: Caller) -> None:
    response = _no_key(alice, "/no/such/route")
    assert_error(response, 404, code="not_found")


def test_wrong_method_is_405_in_openai_shape(alice: Caller) -> None:
    response = alice.http.put("/api/v1/chats")
    assert_error(response, 405, code="method_not_allowed", message="Method Not Allowed")


def test_wrong_method_response_lists_the_allowed_methods(alice: Caller) -> None:
    response = alice.http.put("/api/v1/chats")
    assert response.status_code == 405
    assert sorted(m.strip() for m in response.headers["allow"].split(",")) == ["GET", "POST"]


# --------------------------------------------------------------------------- request ids


REQUESTS: dict[str, Request] = {
    "200": lambda c, chat: c.http.get(f"/api/v1/chats/{chat}"),
    "201": lambda c, chat: c.http.post("/api/v1/chats", json={}),
    "200 stream": lambda c, chat: _send(c, chat, content="hi", stream=True),
    "healthz": lambda c, chat: c.http.get("/healthz"),
    "404 route": lambda c, chat: c.http.get("/nope"),
    "401": lambda c, chat: _no_key(c, "/api/v1/me"),
}


@pytest.mark.parametrize("request_", REQUESTS.values(), ids=REQUESTS.keys())
def test_every_response_carries_a_request_id(alice: Caller, chat_id: str, request_: Request) -> None:
    response = request_(alice, chat_id)
    assert response.status_code < 500
    assert re.fullmatch(r"req_[0-9a-f]{24}", response.headers["x-request-id"])


def test_request_ids_differ_between_requests(alice: Caller) -> None:
    ids = {alice.http.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    "request_id", ["abc-123", "trace.id:42_x", "A" * 128], ids=["simple", "punctuation", "128 characters"]
)
def test_client_request_id_is_echoed(alice: Caller, request_id: str) -> None:
    response = alice.http.get("/api/v1/chats", headers={"x-request-id": request_id})
    assert response.headers["x-request-id"] == request_id


def test_client_request_id_is_echoed_on_errors(alice: Caller) -> None:
    response = alice.http.get(f"/api/v1/chats/{missing_chat_id()}", headers={"x-request-id": "my-trace-1"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "my-trace-1"


@pytest.mark.parametrize(
    "request_id",
    ["has space", "A" * 129, "<script>", "new\\nline", "é"],
    ids=["space", "129 characters", "markup", "backslash", "non-ascii"],
)
def test_unsafe_client_request_id_is_replaced(alice: Caller, request_id: str) -> None:
    response = alice.http.get(
        "/api/v1/chats",
        headers=[(b"x-request-id", request_id.encode())],  # bytes: any header value the wire allows
    )
    assert response.status_code == 200
    assert re.fullmatch(r"req_[0-9a-f]{24}", response.headers["x-request-id"])


def test_response_carries_one_request_id(alice: Caller) -> None:
    response = alice.http.get("/api/v1/chats", headers={"x-request-id": "only-once"})
    assert response.headers.get_list("x-request-id") == ["only-once"]
