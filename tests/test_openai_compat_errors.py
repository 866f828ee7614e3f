"""Errors on /v1 as OpenAI shapes them, raised by the SDK as its own exception classes.

Status codes the SDK maps (401, 400, 404, 429, 5xx), `x-should-retry: false`
where a retry cannot help (so the SDK's own retries behave), upstream errors
relayed byte for byte where they are the client's business, and upstream faults
(errors, timeouts, broken streams) owned by the service.
"""

import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest

from main import create_app
from tests.conftest import Caller, service_settings
from tests.fake_upstream import FakeUpstream
from tests.helpers import SSL_CONTEXT, assert_error
from tests.openapi_schema import OpenAPISchemas
from tests.server import ThreadedServer

MODEL = "gpt-4o-mini"
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]


class Wire:
    """Counts the HTTP requests an SDK client actually sends."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []

    def client(self, base_url: str, key: str, max_retries: int = 0) -> openai.OpenAI:
        def record(request: httpx2.Request) -> None:
            self.requests.append(request)

        http = openai.DefaultHttpxClient(verify=SSL_CONTEXT, event_hooks={"request": [record]})
        return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=max_retries, http_client=http)


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def sdk(alice: Caller, service: str, wire: Wire) -> Iterator[openai.OpenAI]:
    with wire.client(service, alice.key) as client:
        yield client


@pytest.fixture
def retrying_sdk(alice: Caller, service: str, wire: Wire) -> Iterator[openai.OpenAI]:
    """A client that lets the SDK retry (twice) whatever it judges retryable."""
    with wire.client(service, alice.key, max_retries=2) as client:
        yield client


@pytest.fixture(scope="module")
def impatient_service(database_url: str, upstream: FakeUpstream) -> Iterator[str]:
    """The service with a 0.3 s upstream timeout and no retries of its own."""
    settings = service_settings(database_url, upstream, openai_timeout=0.3, openai_max_retries=0)
    with ThreadedServer(create_app(settings)) as server:
        yield server.url


@pytest.fixture(scope="module")
def unreachable_service(database_url: str) -> Iterator[str]:
    """The service configured with an upstream on a port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = service_settings(
        database_url,
        None,
        openai_api_key="sk-unused",
        openai_base_url=f"http://127.0.0.1:{port}/v1",
        openai_max_retries=0,
    )
    with ThreadedServer(create_app(settings)) as server:
        yield server.url


def error_of(
    schemas: OpenAPISchemas,
    raised: pytest.ExceptionInfo[openai.APIStatusError],
    cls: type[openai.APIStatusError],
    status: int,
) -> dict[str, Any]:
    """The exception is exactly `cls` with `status`, its body OpenAI's error shape; returns `error`."""
    exc = raised.value
    assert type(exc) is cls, exc
    assert exc.status_code == status
    body = orjson.loads(exc.response.content)
    assert schemas.errors("ErrorResponse", body) == []
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert exc.body == body["error"]
    error: dict[str, Any] = body["error"]
    return error


def chat_requests(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/chat/completions")


# ------------------------------------------------------------------------- the caller's key


def test_bad_key_raises_authentication_error(service: str, wire: Wire, schemas: OpenAPISchemas) -> None:
    with wire.client(service, "sk-os-not-a-key") as client, pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model=MODEL, messages=HELLO)

    error = error_of(schemas, raised, openai.AuthenticationError, 401)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_api_key", None)


def test_bad_key_never_reaches_the_upstream(service: str, wire: Wire, upstream: FakeUpstream) -> None:
    with wire.client(service, "sk-os-not-a-key") as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HELLO)

    assert upstream.requests == []


def test_bad_key_is_not_retried_by_the_sdk(service: str, wire: Wire) -> None:
    with (
        wire.client(service, "sk-os-not-a-key", max_retries=2) as client,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        client.chat.completions.create(model=MODEL, messages=HELLO)

    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(wire.requests) == 1


def test_missing_key_is_401_in_openai_shape(service: str) -> None:
    response = httpx2.post(f"{service}/v1/chat/completions", json={"model": MODEL, "messages": HELLO})

    assert_error(response, 401, code="missing_api_key")
    assert response.headers["x-should-retry"] == "false"


def test_revoked_key_raises_authentication_error(
    service: str, admin: httpx2.Client, alice: Caller, wire: Wire, schemas: OpenAPISchemas
) -> None:
    key_id = admin.get(f"/api/v1/users/{alice.user_id}/keys").json()["data"][0]["id"]
    assert admin.delete(f"/api/v1/keys/{key_id}").status_code == 200

    with wire.client(service, alice.key) as client, pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model=MODEL, messages=HELLO)

    assert error_of(schemas, raised, openai.AuthenticationError, 401)["code"] == "api_key_revoked"


# ------------------------------------------------------------------------- bad requests


def test_missing_messages_raises_bad_request(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.post("/chat/completions", body={"model": MODEL}, cast_to=httpx2.Response)

    error = error_of(schemas, raised, openai.BadRequestError, 400)
    assert (error["param"], error["code"]) == ("messages", "missing_required_parameter")
    assert upstream.requests == []


def test_empty_messages_raises_bad_request_as_openai_words_it(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=[])

    error = error_of(schemas, raised, openai.BadRequestError, 400)
    assert (error["param"], error["code"]) == ("messages", "empty_array")
    assert upstream.requests == []


def test_messages_of_the_wrong_type_raise_bad_request(sdk: openai.OpenAI, schemas: OpenAPISchemas) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.post("/chat/completions", body={"model": MODEL, "messages": "hi"}, cast_to=httpx2.Response)

    error = error_of(schemas, raised, openai.BadRequestError, 400)
    assert (error["param"], error["code"]) == ("messages", "invalid_type")
    assert error["message"] == "Invalid type for 'messages': expected an array, but got string instead."


def test_missing_model_raises_bad_request(sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.post("/chat/completions", body={"messages": HELLO}, cast_to=httpx2.Response)

    error = error_of(schemas, raised, openai.BadRequestError, 400)
    assert (error["param"], error["code"]) == ("model", "missing_required_parameter")
    assert upstream.requests == []


def test_bad_request_is_not_retried_by_the_sdk(retrying_sdk: openai.OpenAI, wire: Wire) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        retrying_sdk.chat.completions.create(model=MODEL, messages=[])

    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(wire.requests) == 1


def test_invalid_json_body_is_400_in_openai_shape(
    service: str, alice: Caller, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    response = alice.http.post(
        "/v1/chat/completions",
        content=b'{"model": "gpt-4o-mini", "messages": [',
        headers={"content-type": "application/json"},
    )

    assert_error(response, 400, code=None, message="We could not parse the JSON body of your request.")
    assert schemas.errors("ErrorResponse", response.json()) == []
    assert response.headers["x-should-retry"] == "false"
    assert upstream.requests == []


def test_json_body_that_is_not_an_object_is_400(alice: Caller, upstream: FakeUpstream) -> None:
    response = alice.http.post("/v1/chat/completions", json=[{"model": MODEL}])

    assert_error(response, 400, code=None, message="The request body must be a JSON object.")
    assert upstream.requests == []


def test_stream_options_that_are_not_an_object_are_400(alice: Caller, upstream: FakeUpstream) -> None:
    response = alice.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "stream": True, "stream_options": "usage"}
    )

    assert_error(response, 400, code=None, param="stream_options")
    assert upstream.requests == []


# ------------------------------------------------------------------------- models a key may not use


@pytest.fixture
def mini_only(make_user: Callable[..., Caller], service: str, wire: Wire) -> Iterator[openai.OpenAI]:
    """An SDK client whose key may use gpt-4o-mini only."""
    caller = make_user("carol", allowed_models=["gpt-4o-mini"])
    with wire.client(service, caller.key, max_retries=2) as client:
        yield client


def test_model_outside_the_keys_list_raises_not_found(
    mini_only: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        mini_only.chat.completions.create(model="gpt-4o", messages=HELLO)

    error = error_of(schemas, raised, openai.NotFoundError, 404)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert upstream.requests == []


def test_model_outside_the_keys_list_is_refused_for_streams_too(
    mini_only: openai.OpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.NotFoundError):
        mini_only.chat.completions.create(model="o3-mini", messages=HELLO, stream=True)

    assert upstream.requests == []


def test_model_outside_the_keys_list_is_not_retried_by_the_sdk(mini_only: openai.OpenAI, wire: Wire) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        mini_only.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(wire.requests) == 1


def test_model_inside_the_keys_list_is_served(mini_only: openai.OpenAI) -> None:
    completion = mini_only.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

    assert completion.choices[0].message.content == "Echo: hello there"


def test_model_unknown_upstream_is_relayed_as_not_found(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-9-imaginary", messages=HELLO)

    error = error_of(schemas, raised, openai.NotFoundError, 404)
    assert error == {
        "message": "The model `gpt-9-imaginary` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert chat_requests(upstream) == 1


# ------------------------------------------------------------------------- upstream client errors, relayed


def test_upstream_400_is_relayed_byte_for_byte(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    message = "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."
    upstream.fail_next(400, message=message, code="decimal_above_max_value")

    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO, temperature=3)

    expected = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "decimal_above_max_value"}
    }
    assert raised.value.response.content == orjson.dumps(expected)
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_upstream_400_is_not_retried_by_the_sdk(
    retrying_sdk: openai.OpenAI, wire: Wire, upstream: FakeUpstream
) -> None:
    upstream.fail_next(400)

    with pytest.raises(openai.BadRequestError):
        retrying_sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert (len(wire.requests), chat_requests(upstream)) == (1, 1)


def test_upstream_422_is_relayed_as_unprocessable(
    sdk: openai.OpenAI, schemas: OpenAPISchemas, upstream: FakeUpstream
) -> None:
    upstream.fail_next(422)

    with pytest.raises(openai.UnprocessableEntityError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert error_of(schemas, raised, openai.UnprocessableEntityError, 422)["message"] == (
        "Unprocessable entity (injected by FakeUpstream)."
    )


def test_upstream_error_before_a_stream_raises_at_create(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.fail_next(400, message="No streams today.")

    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True)

    assert raised.value.body == {
        "message": "No streams today.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


# ------------------------------------------------------------------------- rate limits


def test_upstream_rate_limit_raises_rate_limit_error_with_retry_after(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    upstream.fail_next(429, times=3, retry_after="0")

    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    error = error_of(schemas, raised, openai.RateLimitError, 429)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert raised.value.response.headers["retry-after"] == "0"


def test_service_retries_a_rate_limit_three_times_before_relaying_it(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.fail_next(429, times=3, retry_after="0")

    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert chat_requests(upstream) == 3


def test_service_gives_up_at_once_when_retry_after_exceeds_its_max_wait(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.fail_next(429, times=3, retry_after="30")

    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert raised.value.response.headers["retry-after"] == "30"
    assert chat_requests(upstream) == 1


def test_rate_limit_leaves_the_retry_to_the_sdk(
    retrying_sdk: openai.OpenAI, wire: Wire, upstream: FakeUpstream
) -> None:
    upstream.fail_next(429, times=4, retry_after="0.01")

    completion = retrying_sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.choices[0].message.content == "Echo: hello there"
    assert (len(wire.requests), chat_requests(upstream)) == (2, 5)


def test_rate_limit_answer_does_not_forbid_retries(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, times=3, retry_after="0")

    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert "x-should-retry" not in raised.value.response.headers


# ------------------------------------------------------------------------- upstream faults, owned by the service


def test_upstream_5xx_that_persists_raises_internal_server_error_502(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    upstream.fail_next(500, times=3, retry_after="0")

    with pytest.raises(openai.InternalServerError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    error = error_of(schemas, raised, openai.InternalServerError, 502)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    assert chat_requests(upstream) == 3


def test_upstream_5xx_once_is_retried_by_the_service(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.fail_next(503, retry_after="0")

    completion = sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.choices[0].message.content == "Echo: hello there"
    assert chat_requests(upstream) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_refusing_the_service_key_is_502_not_the_clients_fault(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas, status: int
) -> None:
    upstream.fail_next(status)

    with pytest.raises(openai.InternalServerError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)

    error = error_of(schemas, raised, openai.InternalServerError, 502)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_auth_failed")
    assert upstream.api_key not in error["message"]
    assert chat_requests(upstream) == 1


def test_upstream_timeout_is_504(
    impatient_service: str, alice: Caller, wire: Wire, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    upstream.hang_next(5.0)  # cut short when the service gives up after 0.3 s

    with wire.client(impatient_service, alice.key) as client, pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=HELLO)

    error = error_of(schemas, raised, openai.InternalServerError, 504)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_timeout")


def test_upstream_timeout_before_a_stream_is_504(
    impatient_service: str, alice: Caller, wire: Wire, upstream: FakeUpstream
) -> None:
    upstream.hang_next(5.0)

    with wire.client(impatient_service, alice.key) as client, pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)

    assert raised.value.status_code == 504


def test_unreachable_upstream_is_502(
    unreachable_service: str, alice: Caller, wire: Wire, schemas: OpenAPISchemas
) -> None:
    with wire.client(unreachable_service, alice.key) as client, pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=HELLO)

    error = error_of(schemas, raised, openai.InternalServerError, 502)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_unreachable")


# ------------------------------------------------------------------------- streams that break


def test_stream_cut_mid_way_raises_during_iteration(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.cut_stream_next(after_chunks=2)
    received: list[str | None] = []

    stream = sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    with pytest.raises(openai.APIError) as raised:
        received.extend(chunk.choices[0].delta.content for chunk in stream)

    assert type(raised.value) is openai.APIError
    assert raised.value.body == {
        "message": "The upstream connection broke off in the middle of the reply.",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_stream_broken",
    }
    assert received == ["", "Echo:", " hello"]


def test_stream_cut_mid_way_never_ends_with_done(
    sdk: openai.OpenAI, upstream: FakeUpstream, schemas: OpenAPISchemas
) -> None:
    upstream.cut_stream_next(after_chunks=1)

    with sdk.chat.completions.with_streaming_response.create(model=MODEL, messages=HELLO, stream=True) as response:
        events = [e for e in b"".join(response.iter_bytes()).split(b"\n\n") if e]

    assert b"[DONE]" not in b"".join(events)
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert schemas.errors("ErrorResponse", last) == []
    assert last["error"]["code"] == "upstream_stream_broken"


def test_stream_helper_raises_when_the_stream_is_cut(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.cut_stream_next(after_chunks=2)

    with pytest.raises(openai.APIError) as raised, sdk.chat.completions.stream(model=MODEL, messages=HELLO) as stream:
        stream.get_final_completion()

    assert raised.value.message == "The upstream connection broke off in the middle of the reply."


def test_stream_cut_with_include_usage_raises_too(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.cut_stream_next(after_chunks=0)

    stream = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    with pytest.raises(openai.APIError) as raised:
        list(stream)

    assert raised.value.message == "The upstream connection broke off in the middle of the reply."
