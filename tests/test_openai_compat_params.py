"""Every OpenAI parameter reaches the upstream exactly as the SDK sent it.

The service owns only `store` and `metadata` (kept here when `store` is true)
and `stream_options.include_usage` (always asked of the upstream); everything
else is relayed untouched, byte for byte when nothing was owned.
"""

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest

from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import SSL_CONTEXT

MODEL = "gpt-4o-mini"
PIXEL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA="

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
JSON_SCHEMA_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
            "required": ["answer", "confidence"],
            "additionalProperties": False,
        },
    },
}

# One case per parameter (or group of parameters that only make sense together).
PARAMETERS: dict[str, dict[str, Any]] = {
    "tools": {"tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": False},
    "named-tool-choice": {
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    "response-format-json-schema": {"response_format": JSON_SCHEMA_FORMAT},
    "response-format-json-object": {"response_format": {"type": "json_object"}},
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "n": {"n": 2},
    "seed": {"seed": 1234},
    "stop-string": {"stop": "\n\n"},
    "stop-list": {"stop": ["END", "STOP"]},
    "user": {"user": "end-user-42"},
    "safety-identifier": {"safety_identifier": "sha256:abcdef"},
    "prompt-cache-key": {"prompt_cache_key": "tenant-7"},
    "temperature": {"temperature": 0.2, "top_p": 0.9},
    "penalties": {"frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"50256": -100}},
    "max-completion-tokens": {"max_completion_tokens": 64},
    "reasoning-effort": {"reasoning_effort": "low", "verbosity": "low"},
    "service-tier": {"service_tier": "flex"},
    "prediction": {"prediction": {"type": "content", "content": "Echo: hello"}},
    "modalities-audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
    "web-search-options": {"web_search_options": {"search_context_size": "low"}},
}


def _image_and_audio_messages() -> list[Any]:
    return [
        {"role": "system", "content": "Describe what you get."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
            ],
        },
    ]


def _tool_round_trip_messages() -> list[Any]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "user", "content": "And so?"},
    ]


EVERYTHING: dict[str, Any] = {key: value for case in PARAMETERS.values() for key, value in case.items()} | {
    "tool_choice": "required"
}


@pytest.fixture
def sent() -> list[bytes]:
    """The bodies the SDK put on the wire, in order."""
    return []


@pytest.fixture
def sdk(alice: Caller, service: str, sent: list[bytes]) -> Iterator[openai.OpenAI]:
    def record(request: httpx2.Request) -> None:
        sent.append(request.read())

    with openai.OpenAI(
        base_url=f"{service}/v1",
        api_key=alice.key,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=SSL_CONTEXT, event_hooks={"request": [record]}),
    ) as client:
        yield client


@pytest.mark.parametrize("params", PARAMETERS.values(), ids=PARAMETERS.keys())
def test_parameter_reaches_the_upstream_byte_for_byte(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream, params: dict[str, Any]
) -> None:
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **params)

    assert upstream.requests[-1].raw_body == sent[-1]
    assert {k: upstream.requests[-1].body[k] for k in params} == params


def test_image_and_audio_content_parts_reach_the_upstream_byte_for_byte(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    messages = _image_and_audio_messages()
    completion = sdk.chat.completions.create(model="gpt-4o", messages=messages)

    assert upstream.requests[-1].raw_body == sent[-1]
    assert upstream.requests[-1].body["messages"] == messages
    assert completion.choices[0].message.content == "Echo: What is this?"


def test_tool_call_history_reaches_the_upstream_byte_for_byte(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    messages = _tool_round_trip_messages()
    sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])

    assert upstream.requests[-1].raw_body == sent[-1]
    assert upstream.requests[-1].body["messages"] == messages


def test_all_parameters_together_reach_the_upstream_byte_for_byte(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    sdk.chat.completions.create(model="gpt-4o", messages=_image_and_audio_messages(), **EVERYTHING)

    assert upstream.requests[-1].raw_body == sent[-1]


def test_unknown_parameters_reach_the_upstream_too(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    extra = {"future_parameter": {"nested": [1, 2.5, None, True]}, "another": "x"}
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body=extra)

    assert upstream.requests[-1].raw_body == sent[-1]
    assert {k: upstream.requests[-1].body[k] for k in extra} == extra


def test_streamed_parameters_reach_the_upstream_with_include_usage_added(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    list(sdk.chat.completions.create(model="gpt-4o", messages=_image_and_audio_messages(), stream=True, **EVERYTHING))

    expected = orjson.loads(sent[-1]) | {"stream_options": {"include_usage": True}}
    assert upstream.requests[-1].body == expected


def test_other_stream_options_are_kept_beside_include_usage(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    options: Any = {"include_obfuscation": False}
    list(
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, stream_options=options
        )
    )

    assert upstream.requests[-1].body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


def test_streamed_parameters_with_include_usage_reach_the_upstream_byte_for_byte(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    list(
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=_image_and_audio_messages(),
            stream=True,
            stream_options={"include_usage": True},
            **EVERYTHING,
        )
    )

    assert upstream.requests[-1].raw_body == sent[-1]


def test_store_and_metadata_stay_with_the_service(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        store=True,
        metadata={"team": "red"},
        **EVERYTHING,
    )

    expected = orjson.loads(sent[-1])
    del expected["store"], expected["metadata"]
    assert upstream.requests[-1].body == expected


def test_streamed_store_and_metadata_stay_with_the_service(
    sdk: openai.OpenAI, sent: list[bytes], upstream: FakeUpstream
) -> None:
    list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            store=True,
            metadata={"team": "red"},
            seed=3,
        )
    )

    expected = orjson.loads(sent[-1]) | {"stream_options": {"include_usage": True}}
    del expected["store"], expected["metadata"]
    assert upstream.requests[-1].body == expected
