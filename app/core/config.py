"""Settings, read once from the environment and `.env`."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./data/openai_service.db"


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_url: str = Field(
        default=DEFAULT_SQLITE_URL,
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://...",
    )
    openai_api_key: SecretStr | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    default_model: str = Field(default="gpt-4o-mini", min_length=1, max_length=128)
    admin_api_key: SecretStr | None = None
    openai_timeout: float = Field(default=60.0, gt=0, le=3600)
    openai_max_retries: int = Field(default=2, ge=0, le=2)
    openai_retry_max_wait: float = Field(default=20.0, ge=0, le=600)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    model_catalog_file: Path | None = Field(
        default=None, description="A JSON file of model entries merged over the shipped catalog"
    )
    context_strategy: Literal["window", "summary", "none"] = Field(
        default="window", description="What chats that do not choose do with messages that no longer fit"
    )
    context_reserve_tokens: int = Field(default=4096, ge=1, le=1_000_000)
    context_safety_margin: int = Field(default=64, ge=0, le=100_000)
    prometheus_multiproc_dir: Path | None = Field(
        default=None, description="Set (by `main.py --workers N`) when several processes share /metrics"
    )
    workers: int = Field(default=1, ge=1, le=64)
    key_cache_seconds: float = Field(default=10.0, ge=0, le=3600, description="How long a checked key is trusted")
    redis_url: str | None = None
    history_retention_days: int | None = Field(
        default=None, ge=1, le=36_500, description="`main.py purge` deletes messages older than this many days"
    )
    local_model: bool = Field(default=True, description="With no OPENAI_API_KEY, answer with the embedded local model")
    local_model_path: Path | None = Field(
        default=None, description="A GGUF file to run instead of the packaged SmolLM2-135M-Instruct"
    )
    local_model_threads: int = Field(default=2, ge=1, le=256)
    local_model_max_tokens: int = Field(default=256, ge=1, le=32768)
    local_model_context: int = Field(default=2048, ge=256, le=131072)
    local_model_timeout: float = Field(default=120.0, gt=0, le=3600)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("admin_api_key")
    @classmethod
    def _long_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation failures into a message naming each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, loaded on first use."""
    return load_settings()


async def app_settings(request: Request) -> Settings:
    """The settings the running app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]
