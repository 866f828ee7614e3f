"""Alembic runs migrations through the app's own async engine setup."""

import asyncio

from sqlalchemy.engine import Connection

from alembic import context
from app.core.config import get_settings, load_settings
from app.db.database import create_engine
from app.db.models import SEARCH_SCHEMA_MARKER, Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    return str(url) if url else get_settings().database_url


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Search structures exist only in migrations (see app.db.models.SEARCH_SCHEMA_MARKER).
    return name is None or SEARCH_SCHEMA_MARKER not in name


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=_include_name,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_engine(load_settings(database_url=_url()))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
