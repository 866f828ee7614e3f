"""Chats: create, list, read, update, delete; always scoped to their owner."""

from typing import Any

from sqlalchemy import ColumnElement, cast, exists, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import NotFoundError
from app.core.security import Principal
from app.db.models import Chat, new_id, utcnow
from app.schemas.chat import ChatCreate, ChatListParams, ChatRead, ChatUpdate
from app.schemas.common import ListParams, Page
from app.services.pagination import cursor_values, paginate


def chat_read(chat: Chat, default_model: str) -> ChatRead:
    return ChatRead(
        id=chat.id,
        title=chat.title,
        model=chat.model or default_model,
        system_prompt=chat.system_prompt,
        params=chat.params,
        metadata=chat.metadata_,
        tags=chat.tags,
        archived=chat.archived,
        pinned=chat.pinned,
        message_count=chat.message_count,
        created_at=chat.created_at,
        updated_at=chat.updated_at,
    )


async def get_owned_chat(session: AsyncSession, principal: Principal, chat_id: str) -> Chat:
    """The caller's chat, or a 404 that does not say whether it exists for someone else."""
    chat = await session.scalar(select(Chat).where(Chat.id == chat_id, Chat.user_id == principal.user_id))
    if chat is None:
        raise NotFoundError(f"No chat found with id '{chat_id}'.", param="chat_id")
    return chat


async def create_chat(session: AsyncSession, principal: Principal, data: ChatCreate) -> Chat:
    """Create a chat for the caller."""
    if data.model is not None:
        principal.check_model(data.model)
    now = utcnow()
    chat = Chat(
        id=new_id("chat"),
        user_id=principal.user_id,
        title=data.title,
        model=data.model,
        system_prompt=data.system_prompt,
        params=data.params.model_dump(exclude_none=True),
        context={},
        metadata_=data.metadata,
        tags=data.tags,
        pinned=data.pinned,
        archived=False,
        next_seq=1,
        message_count=0,
        created_at=now,
        updated_at=now,
    )
    session.add(chat)
    await session.commit()
    return chat


def _has_tag(session: AsyncSession, tag: str) -> ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        return cast(Chat.tags, JSONB).contains([tag])
    each = func.json_each(Chat.tags).table_valued("value")
    return exists(select(1).select_from(each).where(each.c.value == tag))


async def list_chats(
    session: AsyncSession, principal: Principal, page: ListParams, filters: ChatListParams, default_model: str
) -> Page[ChatRead]:
    """The caller's chats, newest first by default."""
    stmt = select(Chat).where(Chat.user_id == principal.user_id)
    if filters.archived is not None:
        stmt = stmt.where(Chat.archived == filters.archived)
    if filters.pinned is not None:
        stmt = stmt.where(Chat.pinned == filters.pinned)
    if filters.tag is not None:
        stmt = stmt.where(_has_tag(session, filters.tag))
    if filters.q:
        for word in filters.q.lower().split():
            stmt = stmt.where(func.lower(Chat.title).contains(word, autoescape=True))
    keys = (Chat.created_at, Chat.id)
    cursor = await cursor_values(
        session,
        select(*keys).where(Chat.id == page.after, Chat.user_id == principal.user_id),
        page.after,
    )
    return await paginate(session, stmt, keys, page, cursor, lambda c: chat_read(c, default_model), lambda c: c.id)


async def update_chat(session: AsyncSession, principal: Principal, chat_id: str, data: ChatUpdate) -> Chat:
    """Change only the fields the caller sent."""
    chat = await get_owned_chat(session, principal, chat_id)
    changes: dict[str, Any] = data.model_dump(exclude_unset=True)
    if changes.get("model") is not None:
        principal.check_model(changes["model"])
    if "params" in changes:
        changes["params"] = data.params.model_dump(exclude_none=True) if data.params else {}
    if "metadata" in changes:
        changes["metadata_"] = changes.pop("metadata") or {}
    if "tags" in changes:
        changes["tags"] = changes["tags"] or []
    for flag in ("archived", "pinned"):
        if flag in changes and changes[flag] is None:
            del changes[flag]
    for name, value in changes.items():
        setattr(chat, name, value)
    chat.updated_at = utcnow()
    await session.commit()
    return chat


async def delete_chat(session: AsyncSession, principal: Principal, chat_id: str) -> None:
    """Delete a chat and, with it, all its messages."""
    chat = await get_owned_chat(session, principal, chat_id)
    await session.delete(chat)
    await session.commit()
