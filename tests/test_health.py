"""Operations endpoints: liveness, readiness, API docs and the OpenAPI schema."""

from collections.abc import Iterator

import httpx2
import pytest

from app.db.migrations import head_revision
from tests.helpers import http_client


@pytest.fixture
def anonymous(service: str) -> Iterator[httpx2.Client]:
    with http_client(service) as client:
        yield client


def test_healthz_is_200_ok_without_a_key(anonymous: httpx2.Client) -> None:
    response = anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_with_migrations_at_head(anonymous: httpx2.Client) -> None:
    head = head_revision()
    assert head is not None
    response = anonymous.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "database": "ok", "migrations": {"current": head, "head": head}}


def test_docs_page_is_html_that_loads_swagger_from_this_service(anonymous: httpx2.Client) -> None:
    response = anonymous.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "/docs/static/swagger-ui-bundle.js" in response.text
    assert "/docs/static/swagger-ui.css" in response.text
    assert "/openapi.json" in response.text
    assert "cdn.jsdelivr.net" not in response.text


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/docs/static/swagger-ui-bundle.js", "javascript"),
        ("/docs/static/swagger-ui.css", "text/css"),
    ],
)
def test_docs_assets_are_served(anonymous: httpx2.Client, path: str, content_type: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 200
    assert content_type in response.headers["content-type"]
    assert len(response.content) > 1000


def test_openapi_schema_lists_the_chat_routes(anonymous: httpx2.Client) -> None:
    response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "openai_service"
    assert {"get", "post"} <= set(schema["paths"]["/api/v1/chats"])
    assert {"get", "patch", "delete"} <= set(schema["paths"]["/api/v1/chats/{chat_id}"])
    assert "post" in schema["paths"]["/api/v1/chats/{chat_id}/messages"]


def test_health_endpoints_carry_a_request_id(anonymous: httpx2.Client) -> None:
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert anonymous.get(path).headers["x-request-id"].startswith("req_"), path
