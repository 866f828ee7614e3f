"""openai_service: create the app, run the server, and the admin CLI.

python main.py [serve] [--host H] [--port P]   migrate, then serve
python main.py migrate                         apply migrations only
python main.py create-user NAME [--admin]
python main.py create-key (--admin | --user-id usr_...) [--name N]
"""

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

import anyio
import uvicorn
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api import health
from app.api.v1.router import api_router, openai_router
from app.core.config import ConfigError, Settings, get_settings
from app.core.errors import install_error_handlers
from app.core.logging import configure_logging, get_logger
from app.core.middleware import RequestContextMiddleware
from app.db.database import create_engine, create_session_factory
from app.db.migrations import head_revision, upgrade_to_head
from app.schemas.users import ApiKeyCreate, UserCreate
from app.services.catalog import ModelCatalog
from app.services.openai import Upstream
from app.services.proxy import Proxy
from app.services.tokens import Tokenizer
from app.services.usage import Accounting, LedgerWriter
from app.services.users import create_key, create_user, ensure_admin_user

log = get_logger("main")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; all resources are opened in its lifespan, none at import."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = create_session_factory(engine)
        app.state.schema_head = head_revision()
        app.state.upstream = Upstream(settings) if settings.openai_api_key else None
        app.state.proxy = (
            Proxy(settings, settings.openai_base_url, settings.openai_api_key.get_secret_value())
            if settings.openai_api_key
            else None
        )
        app.state.ledger = LedgerWriter(app.state.session_factory)
        app.state.ledger.start()
        tokenizer = Tokenizer()
        await anyio.to_thread.run_sync(tokenizer.preload)
        catalog = ModelCatalog.load(overrides=settings.model_catalog_file)
        app.state.accounting = Accounting(catalog, tokenizer)
        if settings.admin_api_key is not None:
            async with app.state.session_factory() as session:
                await ensure_admin_user(session)
        log.info(
            "started",
            extra={
                "upstream": settings.openai_base_url if app.state.upstream else None,
                "database": engine.dialect.name,
            },
        )
        if app.state.upstream is None:
            log.warning("no_upstream", extra={"hint": "set OPENAI_API_KEY to chat with a model"})
        try:
            yield
        finally:
            await app.state.ledger.aclose()
            if app.state.upstream is not None:
                await app.state.upstream.aclose()
            if app.state.proxy is not None:
                await app.state.proxy.aclose()
            await engine.dispose()

    app = FastAPI(
        title="openai_service",
        summary="Chats, history, context and usage stats in front of the OpenAI API.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # Like OpenAI, read a JSON body whatever its Content-Type says.
        strict_content_type=False,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_request_bytes,
        authenticated_prefixes=("/api/v1/", "/v1/"),
    )
    app.include_router(health.router)
    app.include_router(api_router)
    app.include_router(openai_router)

    # Swagger UI served from the installed package, so /docs works offline.
    app.mount("/docs/static", StaticFiles(directory=str(files("swagger_ui") / "static")), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="openai_service API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )

    return app


async def _cli_create_user(settings: Settings, name: str, admin: bool) -> str:
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as session:
            user = await create_user(session, UserCreate(name=name, role="admin" if admin else "user"))
            return user.id
    finally:
        await engine.dispose()


async def _cli_create_key(settings: Settings, user_id: str | None, admin: bool, name: str | None) -> str:
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as session:
            if admin:
                user_id = (await create_user(session, UserCreate(name=name or "admin", role="admin"))).id
            assert user_id is not None
            created = await create_key(session, user_id, ApiKeyCreate(name=name))
            return f"{created.key}\n(user {created.user_id}, key {created.id}; shown once, store it now)"
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="main.py", description="openai_service")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="apply migrations and run the server (default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    sub.add_parser("migrate", help="apply database migrations")
    user = sub.add_parser("create-user", help="create a user and print its id")
    user.add_argument("name")
    user.add_argument("--admin", action="store_true")
    key = sub.add_parser("create-key", help="create an API key and print it (once)")
    who = key.add_mutually_exclusive_group(required=True)
    who.add_argument("--admin", action="store_true", help="for a new admin user")
    who.add_argument("--user-id")
    key.add_argument("--name")
    parser.set_defaults(host=None, port=None)
    args = parser.parse_args(argv)
    command = args.command or "serve"

    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"openai_service: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    upgrade_to_head(settings.database_url)

    if command == "migrate":
        print("database is at the newest schema")
    elif command == "create-user":
        print(asyncio.run(_cli_create_user(settings, args.name, args.admin)))
    elif command == "create-key":
        print(asyncio.run(_cli_create_key(settings, args.user_id, args.admin, args.name)))
    else:
        host = args.host or settings.host
        port = args.port or settings.port
        print(f"openai_service on http://{host}:{port}  (API docs: http://{host}:{port}/docs)", file=sys.stderr)
        if settings.admin_api_key is None:
            print(
                "  no ADMIN_API_KEY set: create an admin key with `python main.py create-key --admin`", file=sys.stderr
            )
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
