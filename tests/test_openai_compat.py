"""The drop-in /v1 endpoint, driven by the official openai SDK: completions and streams.

Parameters passing through, errors, stored completions, models, accounting and
the async client have their own `test_openai_compat_*.py` modules.
"""

import re
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.openapi_schema import OpenAPISchemas

MODEL = "gpt-4o-mini"
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
_ID = re.compile(rb'"id":"(chatcmpl-[0-9a-f]+)"')
_CREATED = re.compile(rb'"created":(\d+)')


def sse_data(raw: bytes) -> list[bytes]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = [event for event in raw.split(b"\n\n") if event.strip()]
    assert all(event.startswith(b"data: ") for event in events), raw
    return [event.removeprefix(b"data: ") for event in events]


def direct_upstream(upstream: FakeUpstream, body: bytes) -> bytes:
    """What the upstream itself answers to `body`, asked without the service in between."""
    headers = {"authorization": f"Bearer {upstream.api_key}", "content-type": "application/json"}
    response = httpx2.post(f"{upstream.base_url}/chat/completions", content=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.content


def as_if_from(reference: bytes, got: bytes) -> bytes:
    """`reference` with its completion id and creation time replaced by those in `got`."""
    ref_id, got_id = _ID.search(reference), _ID.search(got)
    ref_created, got_created = _CREATED.search(reference), _CREATED.search(got)
    assert ref_id is not None, reference
    assert got_id is not None, got
    assert ref_created is not None, reference
    assert got_created is not None, got
    return reference.replace(ref_id.group(0), got_id.group(0)).replace(ref_created.group(0), got_created.group(0))


def stream_raw(sdk: openai.OpenAI, **params: Any) -> tuple[bytes, bytes]:
    """(body the SDK sent, raw bytes it received) for a streamed completion."""
    with sdk.chat.completions.with_streaming_response.create(model=MODEL, stream=True, **params) as response:
        assert response.status_code == 200
        received = b"".join(response.iter_bytes())
        return response.http_request.content, received


# ------------------------------------------------------------------------- whole completions


def test_completion_returns_the_upstream_reply(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.choices[0].message.content == "Echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL


def test_completion_usage_is_the_upstream_count(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    completion = sdk.chat.completions.create(model=MODEL, messages=HELLO)

    totals = upstream.totals
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        totals.prompt_tokens,
        totals.completion_tokens,
    )
    assert completion.usage.total_tokens == totals.prompt_tokens + totals.completion_tokens


def test_completion_bytes_are_the_upstream_bytes(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, seed=7)
    reference = direct_upstream(upstream, raw.http_request.content)

    assert raw.content == as_if_from(reference, raw.content)


def test_completion_validates_against_the_openapi_schema(sdk: openai.OpenAI, schemas: OpenAPISchemas) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)

    assert schemas.errors("CreateChatCompletionResponse", orjson.loads(raw.content)) == []


def test_completion_names_the_upstream_request(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)

    assert raw.headers["x-upstream-request-id"] == upstream.requests[-1].request_id
    assert raw.headers["content-type"] == "application/json"


def test_completion_reports_the_service_overhead(sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)

    overhead = raw.headers["x-openai-service-overhead-ms"]
    assert re.fullmatch(r"\d+\.\d{3}", overhead), overhead


def test_upstream_gets_the_service_key_never_the_clients(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream
) -> None:
    sdk.chat.completions.create(model=MODEL, messages=HELLO, extra_headers={"x-api-key": alice.key})

    headers = upstream.requests[-1].headers
    assert headers["authorization"] == f"Bearer {upstream.api_key}"
    assert alice.key not in " ".join(headers.values())


def test_upstream_base_url_cannot_be_chosen_by_the_client(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    sdk.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        extra_query={"base_url": "http://127.0.0.2:9/v1"},
        extra_headers={"openai-base-url": "http://127.0.0.2:9/v1"},
    )

    assert [(r.method, r.path) for r in upstream.requests] == [("POST", "/v1/chat/completions")]


# ------------------------------------------------------------------------- streams


def test_stream_delivers_the_reply_in_chunks(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    assert [c.choices[0].delta.content for c in chunks] == ["", "Echo:", " hello", " there", None]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, None, "stop"]


def test_stream_content_equals_the_whole_completion(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model=MODEL, messages=HELLO)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_stream_without_include_usage_has_no_usage_anywhere(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    assert [c.usage for c in chunks] == [None] * 5
    assert all(len(c.choices) == 1 for c in chunks)


def test_stream_without_include_usage_looks_like_the_upstreams_own(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    sent, received = stream_raw(sdk, messages=HELLO)
    reference = direct_upstream(upstream, sent)

    assert b'"usage"' not in received
    assert received == as_if_from(reference, received)


@pytest.mark.parametrize(
    "stream_options",
    [None, {}, {"include_usage": False}],
    ids=["no-stream-options", "empty-stream-options", "include-usage-false"],
)
def test_upstream_is_always_asked_for_usage(
    sdk: openai.OpenAI, upstream: FakeUpstream, stream_options: dict[str, Any] | None
) -> None:
    extra: dict[str, Any] = {} if stream_options is None else {"stream_options": stream_options}
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True, **extra))

    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    assert [c.usage for c in chunks] == [None] * 5


def test_stream_with_include_usage_ends_with_the_usage_chunk(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    chunks = list(
        sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
    )

    totals = upstream.totals
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        totals.prompt_tokens,
        totals.completion_tokens,
        totals.prompt_tokens + totals.completion_tokens,
    )
    assert [c.usage for c in chunks[:-1]] == [None] * 5


def test_stream_with_include_usage_is_relayed_byte_for_byte(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    sent, received = stream_raw(sdk, messages=HELLO, stream_options={"include_usage": True})
    reference = direct_upstream(upstream, sent)

    assert upstream.requests[0].raw_body == sent
    assert received == as_if_from(reference, received)


@pytest.mark.parametrize("include_usage", [False, True], ids=["without-usage", "with-usage"])
def test_stream_chunks_validate_against_the_openapi_schema(
    sdk: openai.OpenAI, schemas: OpenAPISchemas, include_usage: bool
) -> None:
    _, received = stream_raw(sdk, messages=HELLO, stream_options={"include_usage": include_usage})
    *chunks, done = sse_data(received)

    assert done == b"[DONE]"
    assert len(chunks) == 6 if include_usage else 5
    assert [schemas.errors("CreateChatCompletionStreamResponse", orjson.loads(c)) for c in chunks] == [[]] * len(chunks)


def test_stream_reports_the_service_overhead(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    with sdk.chat.completions.with_streaming_response.create(model=MODEL, messages=HELLO, stream=True) as response:
        headers = response.headers
        response.read()

    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert re.fullmatch(r"\d+\.\d{3}", headers["x-openai-service-overhead-ms"])
    assert headers["x-upstream-request-id"] == upstream.requests[-1].request_id


def test_stream_helper_yields_content_events(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(model=MODEL, messages=HELLO) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]

    assert deltas == ["", "Echo:", " hello", " there"]


def test_stream_helper_assembles_the_final_completion(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    with sdk.chat.completions.stream(model=MODEL, messages=HELLO, stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()

    totals = upstream.totals
    assert final.choices[0].message.content == "Echo: hello there"
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        totals.prompt_tokens,
        totals.completion_tokens,
    )


def test_stream_helper_without_include_usage_has_no_usage(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(model=MODEL, messages=HELLO) as stream:
        final = stream.get_final_completion()

    assert final.choices[0].message.content == "Echo: hello there"
    assert final.usage is None


class City(BaseModel):
    city: str
    population: int


def test_parse_helper_returns_the_structured_output(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.queue_reply('{"city":"Paris","population":2102650}')

    completion = sdk.chat.completions.parse(model=MODEL, messages=HELLO, response_format=City)

    assert completion.choices[0].message.parsed == City(city="Paris", population=2102650)
    assert upstream.requests[-1].body["response_format"]["type"] == "json_schema"
    assert upstream.requests[-1].body["response_format"]["json_schema"]["name"] == "City"


def test_stream_helper_parses_the_structured_output(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.queue_reply('{"city":"Lyon","population":522250}')

    with sdk.chat.completions.stream(model=MODEL, messages=HELLO, response_format=City) as stream:
        final = stream.get_final_completion()

    assert final.choices[0].message.parsed == City(city="Lyon", population=522250)


def test_stream_chunks_parse_as_sdk_chunk_objects(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    assert {type(c) for c in chunks} == {ChatCompletionChunk}
    assert len({c.id for c in chunks}) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
