"""Small assertions and database peeks shared by the API test modules."""

import asyncio
import secrets
import ssl
from typing import Any

import httpx2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

ERROR_KEYS = {"message", "type", "param", "code"}

# Building an SSL context loads the CA bundle (~50 ms); share one instead of one per client.
SSL_CONTEXT = ssl.create_default_context()


def http_client(base_url: str, key: str | None = None) -> httpx2.Client:
    """A client for the service, sending `key` as a bearer token if given."""
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx2.Client(base_url=base_url, headers=headers, timeout=30, verify=SSL_CONTEXT)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_error(
    response: httpx2.Response,
    status: int,
    *,
    code: str | None,
    param: str | None = None,
    type: str = "invalid_request_error",
    message: str | None = None,
) -> dict[str, Any]:
    """The response is an OpenAI-shaped error with exactly these values; returns the `error` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert error["type"] == type, error
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str)
    assert error["message"], error
    if message is not None:
        assert error["message"] == message, error
    return error


def missing_chat_id() -> str:
    """A well-formed chat id that no chat has."""
    return f"chat_{secrets.token_hex(12)}"


async def _fetch(url: str, statement: str) -> list[tuple[Any, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in (await conn.execute(text(statement))).all()]
    finally:
        await engine.dispose()


async def _run(url: str, statement: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


def fetch_rows(database_url: str, statement: str) -> list[tuple[Any, ...]]:
    """Run a read-only SQL statement against the test database."""
    return asyncio.run(_fetch(database_url, statement))


def execute(database_url: str, statement: str) -> None:
    """Run one SQL statement against the test database, committed."""
    asyncio.run(_run(database_url, statement))
