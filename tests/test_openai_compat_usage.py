"""Every /v1 call lands in the same usage accounting as native chats, with the upstream's own counts."""

from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import SSL_CONTEXT

MODEL = "gpt-4o-mini"


@pytest.fixture
def stats(admin: httpx2.Client) -> Callable[[Caller], dict[str, Any]]:
    """A user's stats summary, read with the admin key (see the last test for the user's own key)."""

    def read(caller: Caller) -> dict[str, Any]:
        response = admin.get("/api/v1/stats/summary", params={"user_ids": caller.user_id})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return read


def counts(summary: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(requests, errors, input, output, estimated) of a stats summary."""
    s = summary
    return s["requests"], s["errors"], s["input_tokens"], s["output_tokens"], s["estimated_requests"]


def chat_requests(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/chat/completions")


def ask(sdk: openai.OpenAI, text: str, **params: Any) -> None:
    messages: Any = [{"role": "user", "content": text}]
    if params.get("stream"):
        list(sdk.chat.completions.create(model=MODEL, messages=messages, **params))
    else:
        sdk.chat.completions.create(model=MODEL, messages=messages, **params)


def test_series_of_calls_is_counted_with_the_upstreams_tokens(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    ask(sdk, "one two three")
    ask(sdk, "four five", stream=True)
    ask(sdk, "six", stream=True, stream_options={"include_usage": True})
    ask(sdk, "seven eight nine ten", store=True)
    ask(sdk, "eleven", stream=True, store=True)

    totals = upstream.totals
    assert counts(stats(alice)) == (5, 0, totals.prompt_tokens, totals.completion_tokens, 0)
    assert chat_requests(upstream) == 5


def test_failed_upstream_attempts_are_counted_as_errors(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    upstream.fail_next(500, retry_after="0")
    ask(sdk, "retried once")
    upstream.fail_next(400)
    with pytest.raises(openai.BadRequestError):
        ask(sdk, "refused")

    totals = upstream.totals
    assert counts(stats(alice)) == (3, 2, totals.prompt_tokens, totals.completion_tokens, 0)
    assert chat_requests(upstream) == 3


def test_cached_and_reasoning_tokens_are_counted(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    upstream.cached_tokens, upstream.reasoning_tokens = 4, 6
    ask(sdk, "think")
    ask(sdk, "think harder", stream=True)

    totals = upstream.totals
    s = stats(alice)
    assert (s["input_cached_tokens"], s["reasoning_tokens"]) == (totals.cached_tokens, totals.reasoning_tokens)
    assert (s["input_cached_tokens"], s["reasoning_tokens"]) == (8, 12)


def test_stream_without_upstream_usage_is_estimated_as_the_upstream_counts(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    upstream.omit_usage_next()
    ask(sdk, "no usage from upstream", stream=True)

    totals = upstream.totals
    assert counts(stats(alice)) == (1, 0, totals.prompt_tokens, totals.completion_tokens, 1)


def test_stream_cut_short_is_counted_as_an_error_with_what_was_sent(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    upstream.cut_stream_next(after_chunks=2)
    with pytest.raises(openai.APIError):
        ask(sdk, "one two three four", stream=True)

    totals = upstream.totals
    assert counts(stats(alice)) == (1, 1, totals.prompt_tokens, totals.completion_tokens, 1)


def test_refused_requests_are_not_counted(
    service: str, alice: Caller, upstream: FakeUpstream, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    http = openai.DefaultHttpxClient(verify=SSL_CONTEXT)
    with (
        openai.OpenAI(base_url=f"{service}/v1", api_key="sk-os-nope", max_retries=0, http_client=http) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        ask(bad, "who am I")
    assert alice.http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 400

    assert counts(stats(alice)) == (0, 0, 0, 0, 0)
    assert upstream.requests == []


def test_calls_are_counted_for_their_own_user_only(
    sdk: openai.OpenAI, alice: Caller, bob: Caller, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    ask(sdk, "mine")

    assert counts(stats(bob)) == (0, 0, 0, 0, 0)
    assert counts(stats(alice))[0] == 1


def test_calls_are_counted_per_model(
    sdk: openai.OpenAI, alice: Caller, stats: Callable[[Caller], dict[str, Any]]
) -> None:
    ask(sdk, "a")
    sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "b"}])
    ask(sdk, "c", stream=True)

    top = {m["model"]: m["requests"] for m in stats(alice)["top_models"]}
    assert top == {"gpt-4o-mini": 2, "gpt-4o": 1}


def test_user_reads_their_own_stats_right_after_a_call(
    sdk: openai.OpenAI, alice: Caller, upstream: FakeUpstream
) -> None:
    ask(sdk, "count me")

    # The ledger row is still queued in memory: reading the stats must write it first, and answer at once.
    response = alice.http.get("/api/v1/stats/summary", timeout=5)

    assert response.status_code == 200, response.text
    totals = upstream.totals
    assert counts(response.json()) == (1, 0, totals.prompt_tokens, totals.completion_tokens, 0)
