"""The async SDK client (`openai.AsyncOpenAI`) against /v1: concurrency, streams, stream helpers, errors."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import SSL_CONTEXT

MODEL = "gpt-4o-mini"
T = TypeVar("T")


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


def chat_requests(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/chat/completions")


class Runner:
    """Runs `scenario(client)` on a fresh event loop with an AsyncOpenAI client (alice's key by default)."""

    def __init__(self, service: str, key: str) -> None:
        self.service, self.key = service, key

    def __call__(self, scenario: Callable[[openai.AsyncOpenAI], Awaitable[T]], key: str | None = None) -> T:
        async def main() -> T:
            http = openai.DefaultAsyncHttpxClient(verify=SSL_CONTEXT)
            async with openai.AsyncOpenAI(
                base_url=f"{self.service}/v1", api_key=key or self.key, max_retries=0, http_client=http
            ) as client:
                return await scenario(client)

        return asyncio.run(main())


@pytest.fixture
def run_with(service: str, alice: Caller) -> Runner:
    return Runner(service, alice.key)


def test_concurrent_completions_each_get_their_own_reply(run_with: Runner, upstream: FakeUpstream) -> None:
    texts = [f"question {i}" for i in range(5)]

    async def scenario(client: openai.AsyncOpenAI) -> list[str | None]:
        completions = await asyncio.gather(
            *(client.chat.completions.create(model=MODEL, messages=user(t)) for t in texts)
        )
        return [c.choices[0].message.content for c in completions]

    assert run_with(scenario) == [f"Echo: {t}" for t in texts]
    assert chat_requests(upstream) == 5


def test_concurrent_streams_each_get_their_own_reply(run_with: Runner) -> None:
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]

    async def one(client: openai.AsyncOpenAI, text: str) -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=user(text), stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def scenario(client: openai.AsyncOpenAI) -> list[str]:
        return list(await asyncio.gather(*(one(client, t) for t in texts)))

    assert run_with(scenario) == [f"Echo: {t}" for t in texts]


def test_async_stream_with_include_usage_ends_with_the_usage_chunk(run_with: Runner, upstream: FakeUpstream) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> list[ChatCompletionChunk]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user("a b c"), stream=True, stream_options={"include_usage": True}
        )
        return [chunk async for chunk in stream]

    chunks = run_with(scenario)

    totals = upstream.totals
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        totals.prompt_tokens,
        totals.completion_tokens,
    )
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_async_stream_without_include_usage_has_no_usage(run_with: Runner) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> list[ChatCompletionChunk]:
        stream = await client.chat.completions.create(model=MODEL, messages=user("a b c"), stream=True)
        return [chunk async for chunk in stream]

    chunks = run_with(scenario)

    assert [c.usage for c in chunks] == [None] * 6
    assert all(len(c.choices) == 1 for c in chunks)


def test_async_stream_helper_assembles_the_final_completion(run_with: Runner) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> tuple[list[str], str | None]:
        async with client.chat.completions.stream(model=MODEL, messages=user("x y")) as stream:
            deltas = [event.delta async for event in stream if event.type == "content.delta"]
            final = await stream.get_final_completion()
        return deltas, final.choices[0].message.content

    assert run_with(scenario) == (["", "Echo:", " x", " y"], "Echo: x y")


def test_async_bad_key_raises_authentication_error(run_with: Runner) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> None:
        await client.chat.completions.create(model=MODEL, messages=user("hi"))

    with pytest.raises(openai.AuthenticationError) as raised:
        run_with(scenario, "sk-os-not-a-key")

    assert raised.value.status_code == 401


def test_async_stream_cut_mid_way_raises_during_iteration(run_with: Runner, upstream: FakeUpstream) -> None:
    upstream.cut_stream_next(after_chunks=1)
    received: list[str | None] = []

    async def scenario(client: openai.AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(model=MODEL, messages=user("one two three"), stream=True)
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError) as raised:
        run_with(scenario)

    assert type(raised.value) is openai.APIError
    assert raised.value.code == "upstream_stream_broken"
    assert received == ["", "Echo:"]


def test_slow_completion_does_not_hold_up_another(run_with: Runner, upstream: FakeUpstream) -> None:
    upstream.hang_next(0.6)  # the point: one call waits on the upstream while another is made

    async def scenario(client: openai.AsyncOpenAI) -> tuple[bool, str | None, str | None]:
        slow = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=user("slow")))
        while chat_requests(upstream) == 0:  # noqa: ASYNC110 - the upstream records requests in another thread
            await asyncio.sleep(0.01)
        fast = await client.chat.completions.create(model=MODEL, messages=user("fast"))
        slow_was_pending = not slow.done()
        return slow_was_pending, fast.choices[0].message.content, (await slow).choices[0].message.content

    assert run_with(scenario) == (True, "Echo: fast", "Echo: slow")
