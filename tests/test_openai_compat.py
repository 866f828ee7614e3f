"""The drop-in /v1 endpoint, driven by the official openai SDK."""

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream


@pytest.fixture
def sdk(alice: Caller, service: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service}/v1", api_key=alice.key, max_retries=0) as client:
        yield client


def test_non_stream_completion_through_the_sdk(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: hello there"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 4)
    assert float(raw.headers["x-openai-service-overhead-ms"]) >= 0
    assert raw.headers["x-upstream-request-id"].startswith("req_")


def test_stream_without_include_usage_hides_the_usage_chunk(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    chunks = list(
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a b"}], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: a b"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}


def test_stream_with_include_usage_gets_it(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "a b"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
