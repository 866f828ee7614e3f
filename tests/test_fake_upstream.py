"""Quick tests of the fake OpenAI upstream itself, using the official SDK as client."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _reset_fake(fake: FakeUpstream) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def client(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0) as c:
        yield c


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there world"},
]
# o200k_base: 3 + (3 + 1 "system" + 4 "You are terse.") + (3 + 1 "user" + 3) + 3 = 18 prompt tokens;
# the reply "Echo: Hello there world" is 5 tokens ("Echo", ":", " Hello", " there", " world").
PROMPT_TOKENS = 18


def test_non_stream_completion(fake: FakeUpstream, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint == "fp_fake"
    assert completion.service_tier == "default"
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: Hello there world"
    assert choice.message.refusal is None
    assert completion.usage is not None
    assert completion.usage.total_tokens == 23
    assert raw.http_response.json()["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 5,
        "total_tokens": 23,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }

    (record,) = fake.requests
    assert (record.method, record.path) == ("POST", "/v1/chat/completions")
    assert record.headers["authorization"] == f"Bearer {fake.api_key}"
    assert record.body["messages"] == MESSAGES
    assert record.request_id == raw.headers["x-request-id"]
    totals = fake.totals
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (
        1,
        PROMPT_TOKENS,
        5,
    )


def test_truncation_and_extra_usage(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.cached_tokens = 5
    fake.reasoning_tokens = 7
    fake.queue_reply("alpha beta gamma delta")
    completion = client.chat.completions.create(model="o3-mini", messages=MESSAGES, max_completion_tokens=3)
    assert completion.choices[0].message.content == "alpha beta gamma"
    assert completion.choices[0].finish_reason == "length"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        PROMPT_TOKENS,
        10,
        28,
    )
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7
    totals = fake.totals
    assert (
        totals.cached_tokens,
        totals.reasoning_tokens,
        totals.completion_tokens,
    ) == (5, 7, 10)


def test_stream_with_usage(fake: FakeUpstream, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)

    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o" for c in chunks)
    first, *words, finish, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in words] == [
        "Echo:",
        " Hello",
        " there",
        " world",
    ]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    for chunk in chunks[:-1]:
        assert "usage" in chunk.model_fields_set
        assert chunk.usage is None
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (
        PROMPT_TOKENS,
        5,
    )
    assert usage_chunk.usage.total_tokens == 23
    assert fake.totals.completion_tokens == 5


def test_stream_without_usage(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.queue_reply("one two")
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)
    assert len(chunks) == 4  # role, "one", " two", finish
    assert [c.choices[0].delta.content for c in chunks] == ["", "one", " two", None]
    assert all(c.choices and "usage" not in c.model_fields_set for c in chunks)


def test_omit_usage_next(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.omit_usage_next()
    with client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_rate_limit_with_retry_after(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.fail_next(429, retry_after=20)
    with pytest.raises(openai.RateLimitError) as excinfo:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = excinfo.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "20"
    assert err.code == "rate_limit_exceeded"
    assert err.type == "requests"
    assert err.request_id is not None
    assert err.request_id.startswith("req_")
    # the fault was consumed: the next request succeeds
    ok = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ok.choices[0].message.content == "Echo: Hello there world"
    assert len(fake.requests) == 2
    assert fake.totals.requests == 1


def _collect_contents(stream: Iterable[ChatCompletionChunk], into: list[str | None]) -> None:
    for chunk in stream:
        into.append(chunk.choices[0].delta.content)


def test_cut_stream_raises_in_sdk(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.queue_reply("one two three four")
    fake.cut_stream_next(2)
    received: list[str | None] = []
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream, pytest.raises(openai.APIConnectionError):
        _collect_contents(stream, received)
    assert received == ["", "one", " two"]
    totals = fake.totals
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (
        1,
        PROMPT_TOKENS,
        2,
    )


def test_bad_api_key(fake: FakeUpstream) -> None:
    with (
        openai.OpenAI(base_url=fake.base_url, api_key="sk-wrong-key", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as excinfo,
    ):
        bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = excinfo.value
    assert err.status_code == 401
    assert err.code == "invalid_api_key"
    assert err.type == "invalid_request_error"
    assert isinstance(err.body, dict)
    assert err.body["message"].startswith("Incorrect API key provided")
    assert err.body["param"] is None
    assert err.response.headers["x-request-id"].startswith("req_")
    assert fake.requests[0].headers["authorization"] == "Bearer sk-wrong-key"
    assert fake.totals.requests == 0


def test_models_and_unknown_model(fake: FakeUpstream, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1-mini",
        "o3-mini",
    ]
    assert client.models.retrieve("gpt-4o").owned_by == "system"
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.models.retrieve("gpt-9")
    assert excinfo.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert excinfo.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert bad.value.code == "empty_array"


def test_hang_times_out_without_blocking_others(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.hang_next(5)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    # the hung request is still sleeping server-side; this one is served at once
    ok = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert ok.choices[0].message.content == "Echo: Hello there world"
    assert time.monotonic() - started < 2
    assert fake.totals.requests == 1  # the abandoned request is never answered


def test_slow_stream_disconnect(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.slow_stream(0.1)
    fake.queue_reply(" ".join(f"w{i}" for i in range(50)))
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        for index, _chunk in enumerate(stream):
            if index == 2:
                break
    deadline = time.monotonic() + 3
    while fake.totals.requests == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    totals = fake.totals
    assert totals.requests == 1
    assert 2 <= totals.completion_tokens < 10
