"""The engine and the per-request session."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from app.core.config import Settings

SessionFactory = async_sessionmaker[AsyncSession]


def create_engine(settings: Settings) -> AsyncEngine:
    """An engine for `DATABASE_URL`, with SQLite made safe for concurrent writers."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite":
        # No pre-ping (a round trip per checkout): a connection the server dropped fails one
        # request, and the pool then replaces its connections; recycling keeps them fresh.
        return create_async_engine(url, pool_size=20, max_overflow=20, pool_recycle=1800)

    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN is ours (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        # SQLite's lower() folds ASCII only; make it fold all of Unicode, as PostgreSQL's does.
        dbapi_connection.create_function("lower", 1, _unicode_lower, deterministic=True)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes fails at once with
        # SQLITE_BUSY when another writer got in between; IMMEDIATE takes the
        # write lock up front and waits for it (busy_timeout) instead. Writers
        # are serialized either way on SQLite; PostgreSQL has no such limit.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def session_factory(request: Request) -> SessionFactory:
    """The app's session factory, for work that outlives the request's session."""
    factory: SessionFactory = request.app.state.session_factory
    return factory


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, closed (rolled back if uncommitted) when the endpoint returns."""
    async with session_factory(request)() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
