"""The OpenAPI validation helper (tests/openapi_schema.py) itself: it checks what it claims to."""

from typing import Any

import pytest

from tests.openapi_schema import OpenAPISchemas, load_spec

CHUNK: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}],
}


def test_the_official_spec_is_openapi_3_1(schemas: OpenAPISchemas) -> None:
    assert load_spec()["openapi"] == schemas.version == "3.1.0"
    assert {"CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ErrorResponse"} <= set(
        schemas.schemas
    )


def test_nullable_fields_accept_null(schemas: OpenAPISchemas) -> None:
    assert schemas.errors("CreateChatCompletionStreamResponse", CHUNK) == []


def test_a_missing_required_field_is_reported(schemas: OpenAPISchemas) -> None:
    chunk = {k: v for k, v in CHUNK.items() if k != "choices"}

    assert schemas.errors("CreateChatCompletionStreamResponse", chunk) == ["<root>: 'choices' is a required property"]


def test_references_are_followed(schemas: OpenAPISchemas) -> None:
    body = {"error": {"message": "m", "type": "t", "param": None}}

    assert schemas.errors("ErrorResponse", body) == ["error: 'code' is a required property"]


def test_a_wrong_enum_value_is_reported(schemas: OpenAPISchemas) -> None:
    chunk = {**CHUNK, "object": "chat.completion"}

    assert schemas.errors("CreateChatCompletionStreamResponse", chunk) == [
        "object: 'chat.completion' is not one of ['chat.completion.chunk']"
    ]


def test_validate_raises_with_every_violation(schemas: OpenAPISchemas) -> None:
    with pytest.raises(AssertionError, match="'choices' is a required property"):
        schemas.validate("CreateChatCompletionStreamResponse", {})


@pytest.mark.parametrize("version", ["3.0.3", "3.1.0"])
def test_nullable_is_honoured_in_either_openapi_version(version: str) -> None:
    spec = {"openapi": version, "components": {"schemas": {"N": {"type": "string", "nullable": True}}}}
    schemas = OpenAPISchemas(spec)

    assert (schemas.errors("N", None), schemas.errors("N", "x")) == ([], [])
    assert schemas.errors("N", 1) == ["<root>: 1 is not of type 'string', 'null'"]


def test_nullable_enum_accepts_null() -> None:
    spec = {"openapi": "3.1.0", "components": {"schemas": {"E": {"type": "string", "enum": ["a"], "nullable": True}}}}

    assert OpenAPISchemas(spec).errors("E", None) == []


def test_a_document_that_is_not_openapi_3_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not an OpenAPI 3\.x document"):
        OpenAPISchemas({"swagger": "2.0", "components": {"schemas": {}}})
