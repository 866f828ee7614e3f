from typing import Annotated

from fastapi import APIRouter, Query, status

from app.core.security import AdminPrincipal, CurrentPrincipal, KeyCacheDep
from app.db.database import SessionDep
from app.schemas.common import Deleted, ListParams, Page
from app.schemas.context import SavedContextRead, SavedContextWrite
from app.schemas.users import ApiKeyCreate, ApiKeyCreated, ApiKeyRead, KeyLimits, MeRead, UserCreate, UserRead
from app.services import users
from app.services.limits import LimiterDep

router = APIRouter(tags=["users and keys"])


@router.get("/me")
async def read_me(principal: CurrentPrincipal, session: SessionDep) -> MeRead:
    """The caller: user, role and key."""
    return await users.describe_caller(session, principal)


@router.get("/me/context")
async def read_saved_context(principal: CurrentPrincipal, session: SessionDep) -> SavedContextRead:
    """Your standing instructions and facts, placed after the system prompt in every chat."""
    return await users.read_saved_context(session, principal)


@router.put("/me/context")
async def write_saved_context(
    data: SavedContextWrite, principal: CurrentPrincipal, session: SessionDep
) -> SavedContextRead:
    """Replace your standing instructions and facts; empty content clears them."""
    return await users.write_saved_context(session, principal, data)


@router.post("/users", status_code=status.HTTP_201_CREATED)
async def create_user(data: UserCreate, _: AdminPrincipal, session: SessionDep) -> UserRead:
    """Create a user (admin)."""
    return users.user_read(await users.create_user(session, data))


@router.get("/users")
async def list_users(page: Annotated[ListParams, Query()], _: AdminPrincipal, session: SessionDep) -> Page[UserRead]:
    """List users, newest first (admin)."""
    return await users.list_users(session, page)


@router.post("/users/{user_id}/keys", status_code=status.HTTP_201_CREATED)
async def create_key(user_id: str, data: ApiKeyCreate, _: AdminPrincipal, session: SessionDep) -> ApiKeyCreated:
    """Issue an API key for a user (admin); the secret `key` is shown this once only."""
    return await users.create_key(session, user_id, data)


@router.get("/users/{user_id}/keys")
async def list_keys(
    user_id: str, page: Annotated[ListParams, Query()], _: AdminPrincipal, session: SessionDep
) -> Page[ApiKeyRead]:
    """List a user's keys, without their secrets (admin)."""
    return await users.list_keys(session, user_id, page)


@router.patch("/keys/{key_id}")
async def update_key_limits(
    key_id: str, data: KeyLimits, _: AdminPrincipal, session: SessionDep, cache: KeyCacheDep, limiter: LimiterDep
) -> ApiKeyRead:
    """Set a key's limits: `rpm_limit`, `tpm_limit`, `budget_usd` (null clears one; absent leaves it) (admin)."""
    key = await users.update_key_limits(session, key_id, data)
    cache.drop_key(key_id)
    limiter.forget(key_id)
    return key


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, _: AdminPrincipal, session: SessionDep, cache: KeyCacheDep) -> Deleted:
    """Revoke an API key at once (admin)."""
    await users.revoke_key(session, key_id)
    cache.drop_key(key_id)
    return Deleted(id=key_id, object="api_key.deleted")
