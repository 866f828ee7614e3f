"""Chats: create, list, read, update, delete; always scoped to their owner."""

from dataclasses import asdict
from typing import Any

from sqlalchemy import ColumnElement, cast, exists, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import NotFoundError
from app.core.security import Principal
from app.db.models import Chat, new_id, utcnow
from app.schemas.chat import ChatCreate, ChatListParams, ChatParams, ChatRead, ChatUpdate
from app.schemas.common import ListParams, Page
from app.schemas.context import BudgetRead, ContextPart, ContextRead, DroppedRead, SummaryRead
from app.services.pagination import cursor_values, paginate
from app.services.runtime import ChatRuntime


def chat_read(chat: Chat, runtime: ChatRuntime) -> ChatRead:
    context = {"strategy": runtime.default_strategy, "max_context_tokens": None, "reserve_tokens": None}
    return ChatRead(
        id=chat.id,
        title=chat.title,
        model=chat.model or runtime.default_model,
        system_prompt=chat.system_prompt,
        instructions=chat.instructions,
        params=chat.params,
        context=context | {k: v for k, v in (chat.context or {}).items() if v is not None},
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


def build_chat(principal: Principal, data: ChatCreate, message_count: int = 0) -> Chat:
    """A new chat of the caller's, not yet added to a session."""
    now = utcnow()
    return Chat(
        id=new_id("chat"),
        user_id=principal.user_id,
        title=data.title,
        model=data.model,
        system_prompt=data.system_prompt,
        instructions=data.instructions,
        params=data.params.model_dump(exclude_none=True),
        context=data.context.model_dump(exclude_none=True),
        metadata_=data.metadata,
        tags=data.tags,
        pinned=data.pinned,
        archived=False,
        next_seq=message_count + 1,
        message_count=message_count,
        created_at=now,
        updated_at=now,
    )


async def create_chat(session: AsyncSession, principal: Principal, data: ChatCreate) -> Chat:
    """Create a chat for the caller."""
    if data.model is not None:
        principal.check_model(data.model)
    chat = build_chat(principal, data)
    session.add(chat)
    await session.commit()
    return chat


def _has_tag(session: AsyncSession, tag: str) -> ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        return cast(Chat.tags, JSONB).contains([tag])
    each = func.json_each(Chat.tags).table_valued("value")
    return exists(select(1).select_from(each).where(each.c.value == tag))


async def list_chats(
    session: AsyncSession, principal: Principal, page: ListParams, filters: ChatListParams, runtime: ChatRuntime
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
    return await paginate(session, stmt, keys, page, cursor, lambda c: chat_read(c, runtime), lambda c: c.id)


async def update_chat(session: AsyncSession, principal: Principal, chat_id: str, data: ChatUpdate) -> Chat:
    """Change only the fields the caller sent."""
    chat = await get_owned_chat(session, principal, chat_id)
    changes: dict[str, Any] = data.model_dump(exclude_unset=True)
    if changes.get("model") is not None:
        principal.check_model(changes["model"])
    if "params" in changes:
        changes["params"] = data.params.model_dump(exclude_none=True) if data.params else {}
    if "context" in changes:
        changes["context"] = data.context.model_dump(exclude_none=True) if data.context else {}
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


async def context_preview(
    session: AsyncSession, runtime: ChatRuntime, principal: Principal, chat_id: str
) -> ContextRead:
    """A dry run: exactly what the chat's next send would put upstream (before the new message)."""
    chat = await get_owned_chat(session, principal, chat_id)
    model = chat.model or runtime.default_model
    params = ChatParams.model_validate(chat.params).upstream()
    plan = await runtime.context.plan(session, chat, model, params, chat.next_seq)
    dropped = None
    if plan.dropped_before_seq is not None:
        dropped = DroppedRead(
            reason="summary_pending" if plan.to_summarise else "window",
            messages=await runtime.context.dropped_count(session, chat, plan),
            before_seq=plan.dropped_before_seq,
        )
    summary = plan.summary
    return ContextRead(
        chat_id=chat.id,
        model=model,
        strategy=plan.strategy,
        exact=plan.exact,
        budget=BudgetRead(**asdict(plan.budget)),
        total_tokens=plan.total_tokens,
        messages=[
            ContextPart(kind=p.kind, message_id=p.message_id, role=p.message["role"], tokens=p.tokens, pinned=p.pinned)
            for p in plan.parts
        ],
        summary=None
        if summary is None
        else SummaryRead(
            id=summary.id, up_to_seq=summary.up_to_seq, tokens=summary.token_count, created_at=summary.created_at
        ),
        dropped=dropped,
    )
