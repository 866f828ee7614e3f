"""`GET /v1/models` and `GET /v1/models/{model}` through the SDK, filtered by a key's allowed models."""

from collections.abc import Callable, Iterator

import openai
import orjson
import pytest

from tests.conftest import Caller, sdk_for
from tests.fake_upstream import DEFAULT_MODELS, MODEL_CREATED, MODEL_OWNER, FakeUpstream
from tests.openapi_schema import OpenAPISchemas


@pytest.fixture
def limited(make_user: Callable[..., Caller], service: str) -> Iterator[openai.OpenAI]:
    """A client whose key may use gpt-4o and o3-mini only."""
    caller = make_user("carol", allowed_models=["gpt-4o", "o3-mini"])
    with sdk_for(service, caller.key) as client:
        yield client


def test_models_list_shows_the_upstreams_models(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()

    assert [(m.id, m.object, m.created, m.owned_by) for m in models] == [
        (model, "model", MODEL_CREATED, MODEL_OWNER) for model in DEFAULT_MODELS
    ]


def test_models_list_validates_against_the_openapi_schema(sdk: openai.OpenAI, schemas: OpenAPISchemas) -> None:
    raw = sdk.models.with_raw_response.list()

    assert schemas.errors("ListModelsResponse", orjson.loads(raw.content)) == []


def test_models_list_is_filtered_by_the_keys_allowed_models(limited: openai.OpenAI) -> None:
    assert [m.id for m in limited.models.list()] == ["gpt-4o", "o3-mini"]


def test_model_retrieve_describes_one_model(sdk: openai.OpenAI) -> None:
    model = sdk.models.retrieve("gpt-4o")

    assert (model.id, model.object, model.created, model.owned_by) == ("gpt-4o", "model", MODEL_CREATED, MODEL_OWNER)


def test_model_retrieve_validates_against_the_openapi_schema(sdk: openai.OpenAI, schemas: OpenAPISchemas) -> None:
    raw = sdk.models.with_raw_response.retrieve("gpt-4o")

    assert schemas.errors("Model", orjson.loads(raw.content)) == []


def test_unknown_model_is_not_found(sdk: openai.OpenAI, schemas: OpenAPISchemas) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.models.retrieve("gpt-9-imaginary")

    body = orjson.loads(raised.value.response.content)
    assert schemas.errors("ErrorResponse", body) == []
    assert (body["error"]["param"], body["error"]["code"]) == ("model", "model_not_found")
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_model_outside_the_keys_list_is_not_found(limited: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        limited.models.retrieve("gpt-4o-mini")

    assert raised.value.code == "model_not_found"


def test_model_inside_the_keys_list_is_found(limited: openai.OpenAI) -> None:
    assert limited.models.retrieve("o3-mini").id == "o3-mini"


def test_models_need_a_valid_key(service: str, upstream: FakeUpstream) -> None:
    with sdk_for(service, "sk-os-not-a-key") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()

    assert upstream.requests == []
