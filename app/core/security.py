"""API keys and the caller's identity.

Keys are `sk-os-` followed by 43 random URL-safe characters (256 bits). Only
their SHA-256 is stored: with that much entropy a fast hash is safe, and it
keeps authentication to one indexed lookup.
"""

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select

from app.core.config import SettingsDep
from app.core.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from app.db.database import session_factory
from app.db.models import ApiKey, User, utcnow

KEY_PREFIX = "sk-os-"
ADMIN_USER_ID = "usr_admin"
ENV_ADMIN_KEY_ID = "key_env_admin"


def generate_key() -> str:
    """A new secret API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """What may be shown of a key after creation: enough to recognise it."""
    return key[: len(KEY_PREFIX) + 6]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user behind the key, and the key's own limits."""

    user_id: str
    role: str
    key_id: str
    key_name: str | None
    allowed_models: tuple[str, ...] | None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    budget_usd: Decimal | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def check_model(self, model: str) -> None:
        """Refuse a model this key may not use, as OpenAI answers for an unknown one."""
        if self.allowed_models is not None and model not in self.allowed_models:
            raise NotFoundError(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )


def bearer_token(header: str | None) -> str:
    """The key in an `Authorization: Bearer` header, or a 401 saying what is wrong with it."""
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Provide it in the Authorization header (Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise AuthenticationError("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
    return token


class KeyCache:
    """Recently authenticated keys, so that a busy key is not looked up on every request.

    An entry lives `ttl` seconds (KEY_CACHE_SECONDS; 0 turns the cache off) and never past
    the key's own expiry. Revoking a key drops it here at once; other instances of the
    service stop accepting it within `ttl`.
    """

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        self._ttl = ttl
        self._size = size
        self._entries: dict[str, tuple[float, Principal, datetime | None]] = {}

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        stored, principal, expires_at = entry
        if time.monotonic() - stored > self._ttl or (expires_at is not None and expires_at <= utcnow()):
            self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal, expires_at: datetime | None) -> None:
        if self._ttl <= 0:
            return
        if len(self._entries) >= self._size:
            self._entries.clear()  # rare, and a miss only costs a lookup
        self._entries[digest] = (time.monotonic(), principal, expires_at)

    def drop_key(self, key_id: str) -> None:
        """Forget a key at once (it was revoked, or its limits changed)."""
        for digest, (_, principal, _) in list(self._entries.items()):
            if principal.key_id == key_id:
                del self._entries[digest]


async def key_cache(request: Request) -> KeyCache:
    cache: KeyCache = request.app.state.key_cache
    return cache


KeyCacheDep = Annotated[KeyCache, Depends(key_cache)]


async def current_principal(request: Request, settings: SettingsDep, cache: KeyCacheDep) -> Principal:
    """Authenticate the bearer key: unknown, revoked and expired keys are all a 401."""
    token = bearer_token(request.headers.get("authorization"))
    admin_key = settings.admin_api_key
    if admin_key is not None and hmac.compare_digest(token.encode(), admin_key.get_secret_value().encode()):
        return Principal(ADMIN_USER_ID, "admin", ENV_ADMIN_KEY_ID, "ADMIN_API_KEY", None)

    digest = hash_key(token)
    if (cached := cache.get(digest)) is not None:
        return cached
    # A session of its own, closed at once: held, it would keep a pooled connection (and,
    # on SQLite, the write lock) through whatever the request waits on next, e.g. the model.
    async with session_factory(request)() as session:
        row = (
            await session.execute(
                select(ApiKey, User.role).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == digest)
            )
        ).first()
    if row is None:
        raise AuthenticationError("Incorrect API key provided.")
    key, role = row
    if key.revoked_at is not None:
        raise AuthenticationError("This API key has been revoked.", code="api_key_revoked")
    if key.expires_at is not None and key.expires_at <= utcnow():
        raise AuthenticationError("This API key has expired.", code="api_key_expired")
    allowed = tuple(key.allowed_models) if key.allowed_models is not None else None
    principal = Principal(key.user_id, role, key.id, key.name, allowed, key.rpm_limit, key.tpm_limit, key.budget_usd)
    cache.put(digest, principal, key.expires_at)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def admin_principal(principal: CurrentPrincipal) -> Principal:
    """Only admins pass."""
    if not principal.is_admin:
        raise PermissionDeniedError("This operation requires an admin API key.")
    return principal


AdminPrincipal = Annotated[Principal, Depends(admin_principal)]
