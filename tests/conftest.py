"""Test fixtures: a real database built by migrations, the service on a real port,
and a faithful fake of the OpenAI API behind it.

`make test` runs on SQLite. With `TEST_DATABASE_URL=postgresql+asyncpg://...` the
same suite runs on PostgreSQL, in a fresh database created for the run and
dropped after it; an unreachable server is an error, never a skip.
Every test starts from empty tables.
"""

import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app.core.config import Settings, load_settings
from app.db.migrations import upgrade_to_head
from app.db.models import Base
from main import create_app
from tests.fake_upstream import FakeUpstream
from tests.helpers import SSL_CONTEXT, http_client
from tests.openapi_schema import OpenAPISchemas, openai_schemas
from tests.server import ThreadedServer

ADMIN_KEY = "sk-admin-" + secrets.token_hex(16)


async def _admin_sql(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        path: Path = tmp_path_factory.mktemp("db") / "test.db"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade_to_head(url)
        yield url
        return
    name = f"openai_service_test_{secrets.token_hex(4)}"
    asyncio.run(_admin_sql(base, f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        asyncio.run(_admin_sql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def service_settings(database_url: str, upstream: FakeUpstream | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "admin_api_key": ADMIN_KEY,
        "openai_timeout": 1.0,
        "openai_retry_max_wait": 2.0,
        "default_model": "gpt-4o-mini",
        "log_level": "warning",
    }
    if upstream is not None:
        values |= {"openai_api_key": upstream.api_key, "openai_base_url": upstream.base_url}
    return load_settings(**(values | overrides))


@pytest.fixture(scope="session")
def service(database_url: str, upstream: FakeUpstream) -> Iterator[str]:
    """The base URL of the service, running with the fake upstream."""
    with ThreadedServer(create_app(service_settings(database_url, upstream))) as server:
        yield server.url


async def _truncate(url: str) -> None:
    engine = create_async_engine(url)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
            else:
                for table in tables:
                    await conn.execute(text(f"DELETE FROM {table}"))
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
def _clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "database_url" in request.fixturenames:
        asyncio.run(_truncate(request.getfixturevalue("database_url")))
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").reset()


@dataclass
class Caller:
    """A user of the service and an HTTP client that sends their key."""

    user_id: str
    key: str
    http: httpx2.Client

    def chat(self, **fields: Any) -> dict[str, Any]:
        response = self.http.post("/api/v1/chats", json=fields)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def admin(service: str) -> Iterator[httpx2.Client]:
    with http_client(service, ADMIN_KEY) as client:
        yield client


@pytest.fixture
def make_user(service: str, admin: httpx2.Client) -> Iterator[Callable[..., Caller]]:
    clients: list[httpx2.Client] = []

    def make(name: str = "user", **key_fields: Any) -> Caller:
        user = admin.post("/api/v1/users", json={"name": name})
        assert user.status_code == 201, user.text
        key = admin.post(f"/api/v1/users/{user.json()['id']}/keys", json=key_fields)
        assert key.status_code == 201, key.text
        secret = key.json()["key"]
        client = http_client(service, secret)
        clients.append(client)
        return Caller(user.json()["id"], secret, client)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def alice(make_user: Callable[..., Caller]) -> Caller:
    return make_user("alice")


@pytest.fixture
def bob(make_user: Callable[..., Caller]) -> Caller:
    return make_user("bob")


def sdk_for(service: str, key: str) -> openai.OpenAI:
    """The official SDK pointed at the service's /v1, with no retries of its own."""
    http = openai.DefaultHttpxClient(verify=SSL_CONTEXT)
    return openai.OpenAI(base_url=f"{service}/v1", api_key=key, max_retries=0, http_client=http)


@pytest.fixture
def sdk(alice: Caller, service: str) -> Iterator[openai.OpenAI]:
    with sdk_for(service, alice.key) as client:
        yield client


@pytest.fixture(scope="session")
def schemas() -> OpenAPISchemas:
    """OpenAI's own schemas, from shared/openai-openapi (loaded once)."""
    return openai_schemas()
