"""`"store": true`: completions kept and managed like OpenAI's stored chat completions."""

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion

from tests.conftest import Caller, sdk_for
from tests.fake_upstream import FakeUpstream
from tests.openapi_schema import OpenAPISchemas

MODEL = "gpt-4o-mini"


@pytest.fixture
def bob_sdk(bob: Caller, service: str) -> Iterator[openai.OpenAI]:
    with sdk_for(service, bob.key) as client:
        yield client


def ask(sdk: openai.OpenAI, text: str, *, model: str = MODEL, **params: Any) -> ChatCompletion:
    messages: Any = [{"role": "user", "content": text}]
    completion: ChatCompletion = sdk.chat.completions.create(model=model, messages=messages, store=True, **params)
    return completion


@pytest.fixture
def stored(sdk: openai.OpenAI) -> ChatCompletion:
    """One stored completion of alice's, with metadata."""
    return ask(sdk, "keep me", metadata={"team": "red", "run": "1"})


# ------------------------------------------------------------------------- keeping


def test_stored_completion_can_be_retrieved(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    got = sdk.chat.completions.retrieve(stored.id)

    assert got.id == stored.id
    assert got.choices == stored.choices
    assert got.usage == stored.usage
    assert (got.model, got.created) == (stored.model, stored.created)


def test_stored_completion_carries_its_metadata(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    got = sdk.chat.completions.retrieve(stored.id)

    assert got.metadata == {"team": "red", "run": "1"}


def test_stored_completion_validates_against_the_openapi_schema(
    sdk: openai.OpenAI, stored: ChatCompletion, schemas: OpenAPISchemas
) -> None:
    raw = sdk.chat.completions.with_raw_response.retrieve(stored.id)

    assert schemas.errors("CreateChatCompletionResponse", orjson.loads(raw.content)) == []


def test_completion_without_store_is_not_kept(sdk: openai.OpenAI) -> None:
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "forget me"}])

    assert sdk.chat.completions.list().data == []


def test_completion_with_store_false_is_not_kept(sdk: openai.OpenAI) -> None:
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "forget me"}], store=False)

    assert sdk.chat.completions.list().data == []


def test_streamed_completion_is_stored_whole(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream me"}],
            stream=True,
            store=True,
            metadata={"via": "stream"},
        )
    )

    got = sdk.chat.completions.retrieve(chunks[0].id)
    totals = upstream.totals
    assert got.choices[0].message.content == "Echo: stream me"
    assert got.choices[0].finish_reason == "stop"
    assert got.metadata == {"via": "stream"}
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (totals.prompt_tokens, totals.completion_tokens)


def test_streamed_stored_completion_validates_against_the_openapi_schema(
    sdk: openai.OpenAI, schemas: OpenAPISchemas
) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream me"}], stream=True, store=True
        )
    )

    raw = sdk.chat.completions.with_raw_response.retrieve(chunks[0].id)
    assert schemas.errors("CreateChatCompletionResponse", orjson.loads(raw.content)) == []


def test_stream_cut_short_is_not_stored(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.cut_stream_next(after_chunks=1)

    with pytest.raises(openai.APIError):
        list(
            sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a b c"}], stream=True, store=True
            )
        )

    assert sdk.chat.completions.list().data == []


def test_failed_completion_is_not_stored(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.fail_next(400)

    with pytest.raises(openai.BadRequestError):
        ask(sdk, "fail me")

    assert sdk.chat.completions.list().data == []


# ------------------------------------------------------------------------- listing


def test_list_shows_the_stored_completions_oldest_first(sdk: openai.OpenAI) -> None:
    ids = [ask(sdk, f"number {i}").id for i in range(3)]

    assert [c.id for c in sdk.chat.completions.list().data] == ids


def test_list_in_descending_order_shows_newest_first(sdk: openai.OpenAI) -> None:
    ids = [ask(sdk, f"number {i}").id for i in range(3)]

    assert [c.id for c in sdk.chat.completions.list(order="desc").data] == ids[::-1]


def test_list_validates_against_the_openapi_schema(
    sdk: openai.OpenAI, stored: ChatCompletion, schemas: OpenAPISchemas
) -> None:
    raw = sdk.chat.completions.with_raw_response.list()

    assert schemas.errors("ChatCompletionList", orjson.loads(raw.content)) == []


def test_list_filters_by_model(sdk: openai.OpenAI) -> None:
    ask(sdk, "small", model="gpt-4o-mini")
    big = ask(sdk, "big", model="gpt-4o")
    ask(sdk, "small again", model="gpt-4o-mini")

    assert [c.id for c in sdk.chat.completions.list(model="gpt-4o").data] == [big.id]


def test_list_filters_by_metadata(sdk: openai.OpenAI) -> None:
    red = ask(sdk, "one", metadata={"team": "red", "env": "prod"})
    ask(sdk, "two", metadata={"team": "blue", "env": "prod"})
    ask(sdk, "three", metadata={"team": "red", "env": "dev"})

    listed = sdk.chat.completions.list(metadata={"team": "red", "env": "prod"})

    assert [c.id for c in listed.data] == [red.id]


def test_list_filters_by_model_and_metadata_together(sdk: openai.OpenAI) -> None:
    ask(sdk, "one", model="gpt-4o", metadata={"team": "blue"})
    wanted = ask(sdk, "two", model="gpt-4o", metadata={"team": "red"})
    ask(sdk, "three", model="gpt-4o-mini", metadata={"team": "red"})

    listed = sdk.chat.completions.list(model="gpt-4o", metadata={"team": "red"})

    assert [c.id for c in listed.data] == [wanted.id]


def test_list_pages_with_limit_and_after(sdk: openai.OpenAI) -> None:
    ids = [ask(sdk, f"number {i}").id for i in range(5)]

    first = sdk.chat.completions.list(limit=2)
    second = sdk.chat.completions.list(limit=2, after=ids[1])
    third = sdk.chat.completions.list(limit=2, after=ids[3])

    assert ([c.id for c in first.data], first.has_more) == (ids[:2], True)
    assert ([c.id for c in second.data], second.has_more) == (ids[2:4], True)
    assert ([c.id for c in third.data], third.has_more) == (ids[4:], False)


def test_list_auto_pagination_walks_every_page(sdk: openai.OpenAI) -> None:
    ids = [ask(sdk, f"number {i}").id for i in range(5)]

    assert [c.id for c in sdk.chat.completions.list(limit=2)] == ids


def test_metadata_filtered_list_pages_with_limit_and_after(sdk: openai.OpenAI) -> None:
    red = [ask(sdk, f"number {i}", metadata={"team": "red" if i % 2 == 0 else "blue"}).id for i in range(6)][::2]

    first = sdk.chat.completions.list(limit=2, metadata={"team": "red"})
    rest = sdk.chat.completions.list(limit=2, metadata={"team": "red"}, after=first.data[-1].id)

    assert ([c.id for c in first.data], first.has_more) == (red[:2], True)
    assert ([c.id for c in rest.data], rest.has_more) == (red[2:], False)


def test_list_with_an_unknown_cursor_is_bad_request(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.list(after="chatcmpl-unknown")

    assert raised.value.code == "invalid_cursor"


# ------------------------------------------------------------------------- managing


def test_update_replaces_the_metadata(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    updated = sdk.chat.completions.update(stored.id, metadata={"team": "blue"})

    assert updated.metadata == {"team": "blue"}
    assert sdk.chat.completions.retrieve(stored.id).metadata == {"team": "blue"}


def test_update_is_seen_by_the_metadata_filter(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    sdk.chat.completions.update(stored.id, metadata={"team": "blue"})

    assert sdk.chat.completions.list(metadata={"team": "red"}).data == []
    assert [c.id for c in sdk.chat.completions.list(metadata={"team": "blue"}).data] == [stored.id]


def test_update_validates_against_the_openapi_schema(
    sdk: openai.OpenAI, stored: ChatCompletion, schemas: OpenAPISchemas
) -> None:
    raw = sdk.chat.completions.with_raw_response.update(stored.id, metadata={"team": "blue"})

    assert schemas.errors("CreateChatCompletionResponse", orjson.loads(raw.content)) == []


def test_update_with_too_many_metadata_pairs_is_bad_request(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.update(stored.id, metadata={f"k{i}": "v" for i in range(17)})

    assert raised.value.param == "metadata"


def test_delete_forgets_the_completion(sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    deleted = sdk.chat.completions.delete(stored.id)

    assert (deleted.id, deleted.object, deleted.deleted) == (stored.id, "chat.completion.deleted", True)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.retrieve(stored.id)
    assert sdk.chat.completions.list().data == []


def test_delete_validates_against_the_openapi_schema(
    sdk: openai.OpenAI, stored: ChatCompletion, schemas: OpenAPISchemas
) -> None:
    raw = sdk.chat.completions.with_raw_response.delete(stored.id)

    assert schemas.errors("ChatCompletionDeleted", orjson.loads(raw.content)) == []


def test_unknown_completion_is_not_found(sdk: openai.OpenAI, schemas: OpenAPISchemas) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.retrieve("chatcmpl-nope")

    assert schemas.errors("ErrorResponse", orjson.loads(raised.value.response.content)) == []


# ------------------------------------------------------------------------- messages


def test_messages_are_the_requests_messages(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello", "name": "alice"},
        ],
        store=True,
    )

    raw = sdk.chat.completions.messages.with_raw_response.list(completion.id)

    assert orjson.loads(raw.content) == {
        "object": "list",
        "data": [
            {"id": f"{completion.id}-0", "role": "system", "content": "Be brief.", "name": None, "content_parts": None},
            {"id": f"{completion.id}-1", "role": "user", "content": "hello", "name": "alice", "content_parts": None},
        ],
        "first_id": f"{completion.id}-0",
        "last_id": f"{completion.id}-1",
        "has_more": False,
    }


def test_messages_page_with_limit_and_after(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"m{i}"} for i in range(3)], store=True
    )

    first = sdk.chat.completions.messages.list(completion.id, limit=2)
    rest = sdk.chat.completions.messages.list(completion.id, limit=2, after=first.data[-1].id)

    assert ([m.content for m in first.data], first.has_more) == (["m0", "m1"], True)
    assert ([m.content for m in rest.data], rest.has_more) == (["m2"], False)


def test_messages_validate_against_the_openapi_schema(
    sdk: openai.OpenAI, stored: ChatCompletion, schemas: OpenAPISchemas
) -> None:
    raw = sdk.chat.completions.messages.with_raw_response.list(stored.id)

    # The spec types each listed message as the model's own (role "assistant", `refusal` required) while
    # its example, like the API, lists the request's messages: only those two complaints may remain.
    assert schemas.errors("ChatCompletionMessageList", orjson.loads(raw.content)) == [
        "data/0: 'refusal' is a required property",
        "data/0/role: 'user' is not one of ['assistant']",
    ]


def test_messages_with_content_parts_keep_their_text_and_parts(sdk: openai.OpenAI) -> None:
    parts: list[Any] = [
        {"type": "text", "text": "What is"},
        {"type": "text", "text": "this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    completion = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], store=True)

    message = sdk.chat.completions.messages.list(completion.id).data[0]

    assert message.content == "What is\nthis?"
    assert message.content_parts is not None
    assert [p.model_dump(exclude_none=True) for p in message.content_parts] == parts


# ------------------------------------------------------------------------- isolation


def test_other_users_cannot_retrieve_a_stored_completion(bob_sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    with pytest.raises(openai.NotFoundError):
        bob_sdk.chat.completions.retrieve(stored.id)


def test_other_users_cannot_update_a_stored_completion(
    sdk: openai.OpenAI, bob_sdk: openai.OpenAI, stored: ChatCompletion
) -> None:
    with pytest.raises(openai.NotFoundError):
        bob_sdk.chat.completions.update(stored.id, metadata={"owner": "bob"})

    assert sdk.chat.completions.retrieve(stored.id).metadata == {"team": "red", "run": "1"}


def test_other_users_cannot_delete_a_stored_completion(
    sdk: openai.OpenAI, bob_sdk: openai.OpenAI, stored: ChatCompletion
) -> None:
    with pytest.raises(openai.NotFoundError):
        bob_sdk.chat.completions.delete(stored.id)

    assert sdk.chat.completions.retrieve(stored.id).id == stored.id


def test_other_users_cannot_read_a_stored_completions_messages(bob_sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    with pytest.raises(openai.NotFoundError):
        bob_sdk.chat.completions.messages.list(stored.id)


def test_other_users_list_is_empty(bob_sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    assert bob_sdk.chat.completions.list().data == []
    assert bob_sdk.chat.completions.list(metadata={"team": "red"}).data == []


def test_other_users_cannot_page_from_a_foreign_cursor(bob_sdk: openai.OpenAI, stored: ChatCompletion) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        bob_sdk.chat.completions.list(after=stored.id)

    assert raised.value.code == "invalid_cursor"
