"""Users and their API keys (admin operations), and the caller's own identity."""

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import NotFoundError
from app.core.security import ADMIN_USER_ID, Principal, display_prefix, generate_key, hash_key
from app.db.models import ApiKey, User, UserContext, new_id, utcnow
from app.schemas.common import ListParams, Page
from app.schemas.context import SavedContextRead, SavedContextWrite
from app.schemas.users import ApiKeyCreate, ApiKeyCreated, ApiKeyRead, KeyLimits, MeRead, UserCreate, UserRead
from app.services.pagination import cursor_values, paginate


def user_read(user: User) -> UserRead:
    return UserRead(id=user.id, name=user.name, role=user.role, created_at=user.created_at)


def key_read(key: ApiKey) -> ApiKeyRead:
    return ApiKeyRead(
        id=key.id,
        user_id=key.user_id,
        name=key.name,
        prefix=key.prefix,
        allowed_models=key.allowed_models,
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        budget_usd=float(key.budget_usd) if key.budget_usd is not None else None,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        created_at=key.created_at,
    )


async def ensure_admin_user(session: AsyncSession) -> None:
    """The user behind ADMIN_API_KEY; safe to run from several instances at once."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    await session.execute(
        insert(User)
        .values(id=ADMIN_USER_ID, name="admin", role="admin", created_at=utcnow())
        .on_conflict_do_nothing(index_elements=[User.id])
    )
    await session.commit()


async def create_user(session: AsyncSession, data: UserCreate) -> User:
    """Create a user."""
    user = User(id=new_id("usr"), name=data.name, role=data.role, created_at=utcnow())
    session.add(user)
    await session.commit()
    return user


async def list_users(session: AsyncSession, page: ListParams) -> Page[UserRead]:
    """Every user, newest first by default."""
    keys = (User.created_at, User.id)
    cursor = await cursor_values(session, select(*keys).where(User.id == page.after), page.after)
    return await paginate(session, select(User), keys, page, cursor, user_read, lambda u: u.id)


async def _get_user(session: AsyncSession, user_id: str) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"No user found with id '{user_id}'.", param="user_id")
    return user


async def create_key(session: AsyncSession, user_id: str, data: ApiKeyCreate) -> ApiKeyCreated:
    """Issue a key for a user; the secret is in this answer and nowhere else."""
    await _get_user(session, user_id)
    secret = generate_key()
    key = ApiKey(
        id=new_id("key"),
        user_id=user_id,
        name=data.name,
        prefix=display_prefix(secret),
        key_hash=hash_key(secret),
        allowed_models=data.allowed_models,
        expires_at=data.expires_at,
        rpm_limit=data.rpm_limit,
        tpm_limit=data.tpm_limit,
        budget_usd=data.budget_usd,
        created_at=utcnow(),
    )
    session.add(key)
    await session.commit()
    return ApiKeyCreated(**key_read(key).model_dump(), key=secret)


async def list_keys(session: AsyncSession, user_id: str, page: ListParams) -> Page[ApiKeyRead]:
    """A user's keys (never their secrets)."""
    await _get_user(session, user_id)
    keys = (ApiKey.created_at, ApiKey.id)
    cursor = await cursor_values(
        session, select(*keys).where(ApiKey.id == page.after, ApiKey.user_id == user_id), page.after
    )
    stmt = select(ApiKey).where(ApiKey.user_id == user_id)
    return await paginate(session, stmt, keys, page, cursor, key_read, lambda k: k.id)


async def _get_key(session: AsyncSession, key_id: str) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"No API key found with id '{key_id}'.", param="key_id")
    return key


async def update_key_limits(session: AsyncSession, key_id: str, data: KeyLimits) -> ApiKeyRead:
    """Set or clear (null) the limits named in `data`; the others stay as they are."""
    key = await _get_key(session, key_id)
    for name in data.model_fields_set:
        setattr(key, name, getattr(data, name))
    await session.commit()
    return key_read(key)


async def revoke_key(session: AsyncSession, key_id: str) -> None:
    """Revoke a key at once; it stays listed, marked revoked."""
    key = await _get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    await session.commit()


async def describe_caller(session: AsyncSession, principal: Principal) -> MeRead:
    """The caller: their user, role and key."""
    user = await session.get(User, principal.user_id)
    return MeRead(
        user=user_read(user) if user else None,
        role=principal.role,
        key_id=principal.key_id,
        key_name=principal.key_name,
        allowed_models=list(principal.allowed_models) if principal.allowed_models is not None else None,
        rpm_limit=principal.rpm_limit,
        tpm_limit=principal.tpm_limit,
        budget_usd=float(principal.budget_usd) if principal.budget_usd is not None else None,
    )


async def read_saved_context(session: AsyncSession, principal: Principal) -> SavedContextRead:
    """The caller's standing instructions and facts."""
    saved = await session.get(UserContext, principal.user_id)
    return SavedContextRead(content=saved.content if saved else "", updated_at=saved.updated_at if saved else None)


async def write_saved_context(session: AsyncSession, principal: Principal, data: SavedContextWrite) -> SavedContextRead:
    """Replace the caller's standing instructions and facts (empty content clears them)."""
    saved = await session.get(UserContext, principal.user_id)
    if not data.content:
        if saved is not None:
            await session.delete(saved)
        await session.commit()
        return SavedContextRead(content="", updated_at=None)
    if saved is None:
        saved = UserContext(user_id=principal.user_id, content=data.content, updated_at=utcnow())
        session.add(saved)
    else:
        saved.content = data.content
        saved.updated_at = utcnow()
    await session.commit()
    return SavedContextRead(content=saved.content, updated_at=saved.updated_at)
