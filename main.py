"""openai_service: create the app, run the server, and the admin CLI.

python main.py [serve] [--host H] [--port P]   migrate, then serve
python main.py migrate                         apply migrations only
python main.py create-user NAME [--admin]
python main.py create-key (--admin | --user-id usr_...) [--name N]
python main.py purge [--days N] [--batch 1000]     delete messages older than N days (HISTORY_RETENTION_DAYS)
"""

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
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
from app.core.metrics import Metrics
from app.core.middleware import RequestContextMiddleware
from app.core.security import KeyCache
from app.db.database import create_engine, create_session_factory
from app.db.migrations import head_revision, upgrade_to_head
from app.db.models import utcnow
from app.schemas.users import ApiKeyCreate, UserCreate
from app.services.catalog import ModelCatalog
from app.services.context import ContextBuilder
from app.services.gateway import Gateway
from app.services.history import purge_history
from app.services.limits import open_limiter
from app.services.local_model import LOCAL_MODEL_NAME, LocalModel, LocalModelError, unavailable_reason
from app.services.openai import Upstream
from app.services.proxy import Proxy
from app.services.runtime import ChatRuntime
from app.services.tokens import Tokenizer
from app.services.usage import Accounting, LedgerWriter
from app.services.users import create_key, create_user, ensure_admin_user

log = get_logger("main")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the engine, model provider, tokenizer, catalog and ledger writer; close them on the way out."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engine = create_engine(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = create_session_factory(engine)
    app.state.schema_head = head_revision()
    app.state.upstream = app.state.proxy = app.state.local_model = None
    app.state.ledger = LedgerWriter(app.state.session_factory)
    app.state.ledger.start()
    app.state.limiter = await open_limiter(settings.redis_url, app.state.session_factory)
    tokenizer = Tokenizer()
    await anyio.to_thread.run_sync(tokenizer.preload)
    catalog = ModelCatalog.load(overrides=settings.model_catalog_file)
    # Late, so that less can fail with the local model's process already started.
    provider = await _open_provider(settings)
    if provider is not None:
        base_url, api_key, app.state.local_model = provider
        app.state.upstream = Upstream(settings, base_url=base_url, api_key=api_key)
        app.state.proxy = Proxy(settings, base_url, api_key)
    if app.state.local_model is not None:
        # Its model is the default model, for the runtime and every reader of SettingsDep,
        # and its context is the size the server was started with.
        app.state.settings = settings.model_copy(update={"default_model": app.state.local_model.name})
        catalog = catalog.with_limits(
            app.state.local_model.name,
            context_window=settings.local_model_context,
            max_output_tokens=settings.local_model_max_tokens,
        )
    app.state.accounting = Accounting(catalog, tokenizer, metrics, app.state.limiter)
    app.state.gateway = Gateway(
        app.state.proxy, app.state.accounting, app.state.ledger, app.state.session_factory, app.state.limiter
    )
    app.state.runtime = ChatRuntime(
        upstream=app.state.upstream,
        accounting=app.state.accounting,
        context=ContextBuilder(tokenizer, catalog, settings),
        factory=app.state.session_factory,
        default_model=app.state.settings.default_model,
        limiter=app.state.limiter,
    )
    if settings.admin_api_key is not None:
        async with app.state.session_factory() as session:
            await ensure_admin_user(session)
    log.info(
        "started",
        extra={
            "upstream": app.state.upstream.base_url if app.state.upstream else None,
            "default_model": app.state.settings.default_model,
            "database": engine.dialect.name,
        },
    )
    if app.state.upstream is None:
        log.warning(
            "no_upstream",
            extra={"hint": "set OPENAI_API_KEY, or run `make local-model` to chat with the local model offline"},
        )
    try:
        yield
    finally:
        await app.state.ledger.aclose()
        await app.state.limiter.aclose()
        if app.state.upstream is not None:
            await app.state.upstream.aclose()
        if app.state.proxy is not None:
            await app.state.proxy.aclose()
        if app.state.local_model is not None:
            await app.state.local_model.stop()
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; all resources are opened in its lifespan, none at import."""
    settings = settings or get_settings()

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
    metrics = app.state.metrics = Metrics(settings.prometheus_multiproc_dir)
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_request_bytes,
        authenticated_prefixes=("/api/v1/", "/v1/"),
        metrics=metrics,
    )
    # /v1 first: its hot path should not be matched against every other route before its own.
    app.include_router(openai_router)
    app.include_router(health.router)
    app.include_router(api_router)

    _mount_docs(app)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI served from the installed package, so /docs works offline."""
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


async def _open_provider(settings: Settings) -> tuple[str, str, LocalModel | None] | None:
    """(base URL, key, local model): OPENAI_API_KEY's provider, else the local model, started here; else None."""
    if settings.openai_api_key:
        return settings.openai_base_url, settings.openai_api_key.get_secret_value(), None
    if not settings.local_model:
        return None
    try:
        local = await LocalModel.start(settings)
    except LocalModelError as exc:
        log.warning("no_local_model", extra={"reason": str(exc)})
        return None
    return local.base_url, local.api_key, local


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


async def _cli_purge(settings: Settings, days: int, batch: int) -> str:
    engine = create_engine(settings)
    try:
        result = await purge_history(create_session_factory(engine), utcnow() - timedelta(days=days), batch)
        return f"purged {result.messages} messages older than {days} days in {result.batches} batches"
    finally:
        await engine.dispose()


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="openai_service")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="apply migrations and run the server (default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="worker processes (default WORKERS, 1)")
    sub.add_parser("migrate", help="apply database migrations")
    user = sub.add_parser("create-user", help="create a user and print its id")
    user.add_argument("name")
    user.add_argument("--admin", action="store_true")
    key = sub.add_parser("create-key", help="create an API key and print it (once)")
    who = key.add_mutually_exclusive_group(required=True)
    who.add_argument("--admin", action="store_true", help="for a new admin user")
    who.add_argument("--user-id")
    key.add_argument("--name")
    purge = sub.add_parser("purge", help="delete messages older than --days (default HISTORY_RETENTION_DAYS)")
    purge.add_argument("--days", type=_positive)
    purge.add_argument("--batch", type=_positive, default=1000, help="messages per transaction (default 1000)")
    parser.set_defaults(host=None, port=None, workers=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"

    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"openai_service: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    days: int | None = getattr(args, "days", None) or settings.history_retention_days
    if command == "purge" and days is None:
        print("openai_service: purge needs --days N or HISTORY_RETENTION_DAYS", file=sys.stderr)
        return 2
    upgrade_to_head(settings.database_url)

    if command == "migrate":
        print("database is at the newest schema")
    elif command == "create-user":
        print(asyncio.run(_cli_create_user(settings, args.name, args.admin)))
    elif command == "create-key":
        print(asyncio.run(_cli_create_key(settings, args.user_id, args.admin, args.name)))
    elif command == "purge":
        assert days is not None
        print(asyncio.run(_cli_purge(settings, days, args.batch)))
    else:
        host = args.host or settings.host
        port = args.port or settings.port
        print(f"openai_service on http://{host}:{port}  (API docs: http://{host}:{port}/docs)", file=sys.stderr)
        if settings.openai_api_key:
            print(f"  model provider: {settings.openai_base_url}", file=sys.stderr)
        elif not settings.local_model:
            print("  no OPENAI_API_KEY and LOCAL_MODEL=false: sending a message answers 503", file=sys.stderr)
        elif (reason := unavailable_reason(settings)) is not None:
            print(f"  no OPENAI_API_KEY, and no local model: {reason}; sends answer 503", file=sys.stderr)
        else:
            print(
                f"  no OPENAI_API_KEY: using the local model {LOCAL_MODEL_NAME} (offline, on the CPU)", file=sys.stderr
            )
        if settings.admin_api_key is None:
            print(
                "  no ADMIN_API_KEY set: create an admin key with `python main.py create-key --admin`", file=sys.stderr
            )
        _serve(settings, host, port, args.workers or settings.workers)
    return 0


def _serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run uvicorn: in this process, or in `workers` processes that share /metrics through files."""
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
        return
    with tempfile.TemporaryDirectory(prefix="openai_service_metrics_") as metrics_dir:
        # The workers read their settings from the environment; this is how they find the metrics files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        print(f"  {workers} worker processes", file=sys.stderr)
        uvicorn.run(
            "main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            access_log=False,
        )


if __name__ == "__main__":
    sys.exit(main())
