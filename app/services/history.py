"""A chat's stored messages: read, save, import, export, clear, and purge by age.

Positions (`seq`) are handed out as the send flow hands them out: one
`UPDATE chats SET next_seq = next_seq + n ... RETURNING` under the chat's row
lock, in the transaction that stores the messages. Reads page by `seq` after
the cursor message's own `seq`, so a page never repeats a message or shifts
because others were written meanwhile. (One caveat, from the send flow: a reply
still being generated has its position reserved right after its question, so it
can appear behind a cursor that has already moved past later messages.)
Reads list every message of the chat; a branch read adds a filter on `active`
(the current branch) or on the path from a leaf up `parent_id`, over the same keys.

Search's derived data follows the messages by itself (a generated column on
PostgreSQL, triggers on SQLite), so a clear, a delete or a purge removes a
message from search in the same transaction.
"""

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

import orjson
from sqlalchemy import CursorResult, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import ConflictError, InvalidRequestError
from app.core.security import Principal
from app.db.database import SessionFactory
from app.db.models import Chat, ChatSummary, HistoryImportRecord, Message, new_id, utcnow
from app.schemas.chat import ChatCreate, MessageRead
from app.schemas.common import Page
from app.schemas.history import HistoryImport, HistoryMessage, HistoryParams, HistorySave
from app.services.chats import build_chat, get_owned_chat
from app.services.messages import message_read
from app.services.pagination import cursor_values, paginate
from app.services.transcript import ToolCallState, check_order, render_markdown

# Chat fields whose attribute on `Chat` has another name.
_CHAT_ATTRIBUTES = {"metadata": "metadata_"}


async def read_messages(
    session: AsyncSession, principal: Principal, chat_id: str, page: HistoryParams
) -> Page[MessageRead]:
    """A page of the caller's chat, in the order the messages were sent."""
    # One query in the common case: ownership and the cursor's position are subqueries.
    owned = select(Chat.id).where(Chat.id == chat_id, Chat.user_id == principal.user_id).exists()
    stmt = select(Message).where(Message.chat_id == chat_id, owned)
    if page.branch is None:
        stmt = stmt.where(Message.active.is_(True))
    elif page.branch != "all":
        stmt = stmt.where(Message.id.in_(await _branch_ids(session, principal, chat_id, page.branch)))
    cursor = select(Message.seq).where(Message.id == page.after, Message.chat_id == chat_id)
    if page.after is not None:
        position = cursor.scalar_subquery()
        stmt = stmt.where(Message.seq < position if page.order == "desc" else Message.seq > position)
    result = await paginate(session, stmt, (Message.seq,), page, None, message_read, lambda m: m.id)
    if not result.data:
        # An empty page: say so, unless the chat is not the caller's (404) or the cursor not in it (400).
        await get_owned_chat(session, principal, chat_id)
        await cursor_values(session, cursor, page.after)
    return result


async def _branch_ids(session: AsyncSession, principal: Principal, chat_id: str, leaf: str) -> list[str]:
    """The ids of the branch that ends at `leaf`: it and its ancestors, by `parent_id`."""
    await get_owned_chat(session, principal, chat_id)
    start = select(Message.id, Message.parent_id).where(Message.id == leaf, Message.chat_id == chat_id)
    branch = start.cte("branch", recursive=True)
    parents = select(Message.id, Message.parent_id).where(Message.chat_id == chat_id, Message.id == branch.c.parent_id)
    branch = branch.union_all(parents)
    ids = list((await session.scalars(select(branch.c.id))).all())
    if not ids:
        raise InvalidRequestError(f"No message '{leaf}' in this chat to read a branch from.", param="branch")
    return ids


def _message_row(
    data: HistoryMessage, *, chat_id: str, user_id: str, seq: int, parent_id: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "id": new_id("msg"),
        "chat_id": chat_id,
        "user_id": user_id,
        "seq": seq,
        "parent_id": parent_id,
        "role": data.role,
        "content": data.content or "",
        "name": data.name,
        "tool_calls": [call.model_dump() for call in data.tool_calls] if data.tool_calls else None,
        "tool_call_id": data.tool_call_id,
        "status": "complete",
        "pinned": False,
        "created_at": now,
    }


def _message_rows(
    messages: Sequence[HistoryMessage], *, chat_id: str, user_id: str, first_seq: int, parent_id: str | None
) -> list[dict[str, Any]]:
    """Rows for messages stored one after another, each the parent of the next."""
    now = utcnow()
    rows = []
    for offset, data in enumerate(messages):
        row = _message_row(data, chat_id=chat_id, user_id=user_id, seq=first_seq + offset, parent_id=parent_id, now=now)
        parent_id = row["id"]
        rows.append(row)
    return rows


async def _tool_call_state(session: AsyncSession, chat_id: str, before_seq: int) -> tuple[ToolCallState, str | None]:
    """What the current branch's last messages leave open (tool calls awaiting answers), and the last one's id."""
    tail = (
        await session.execute(
            select(Message.id, Message.role, Message.tool_calls, Message.tool_call_id)
            .where(Message.chat_id == chat_id, Message.active.is_(True), Message.seq < before_seq)
            .order_by(Message.seq.desc())
            .limit(ToolCallState.LOOKBACK)
        )
    ).all()
    state = ToolCallState.from_tail([(role, calls, call_id) for _, role, calls, call_id in tail])
    return state, tail[0].id if tail else None


async def save_messages(
    session: AsyncSession, principal: Principal, chat_id: str, data: HistorySave
) -> Page[MessageRead]:
    """Append messages made elsewhere to the caller's chat (its current branch), without calling the model."""
    chat = await get_owned_chat(session, principal, chat_id)
    count = len(data.messages)
    # Takes the chat's row lock (SQLite: the write lock) until commit, as a send does.
    next_seq = await session.scalar(
        update(Chat)
        .where(Chat.id == chat.id)
        .values(next_seq=Chat.next_seq + count, message_count=Chat.message_count + count, updated_at=utcnow())
        .returning(Chat.next_seq)
    )
    if next_seq is None:  # deleted since it was read: the same 404 as if it never existed
        chat = await get_owned_chat(session, principal, chat_id)
    assert next_seq is not None
    first_seq = next_seq - count
    state, parent_id = await _tool_call_state(session, chat.id, first_seq)
    check_order(data.messages, state)
    rows = _message_rows(data.messages, chat_id=chat.id, user_id=chat.user_id, first_seq=first_seq, parent_id=parent_id)
    stored = [Message(**row) for row in rows]
    session.add_all(stored)
    await session.commit()
    items = [message_read(m) for m in stored]
    return Page[MessageRead](data=items, first_id=items[0].id, last_id=items[-1].id, has_more=False)


def _request_hash(data: HistoryImport) -> str:
    canonical = orjson.dumps(data.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


async def _replay(session: AsyncSession, principal: Principal, key: str, request_hash: str) -> Chat | None:
    """The chat an earlier import with this key made, if any; the key with another body is a conflict."""
    record = await session.get(HistoryImportRecord, (principal.user_id, key))
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise ConflictError(
            "This Idempotency-Key was already used for an import with a different body. "
            "Use a new key for a different import.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return await get_owned_chat(session, principal, record.chat_id)


@dataclass(frozen=True, slots=True)
class Imported:
    chat: Chat
    replayed: bool = False


async def import_chat(
    session: AsyncSession, principal: Principal, data: HistoryImport, idempotency_key: str | None
) -> Imported:
    """Create a chat from a whole transcript, all or nothing; a retried key returns the first import's chat."""
    if data.model is not None:
        principal.check_model(data.model)
    check_order(data.messages, ToolCallState())
    request_hash = _request_hash(data)
    if idempotency_key is not None:
        earlier = await _replay(session, principal, idempotency_key, request_hash)
        if earlier is not None:
            return Imported(earlier, replayed=True)

    chat = build_chat(principal, data, len(data.messages))
    session.add(chat)
    await session.flush()
    if idempotency_key is not None:
        session.add(
            HistoryImportRecord(
                user_id=principal.user_id, idempotency_key=idempotency_key, request_hash=request_hash, chat_id=chat.id
            )
        )
        try:
            # A concurrent import with the same key waits here for the other to commit, then fails.
            await session.flush()
        except IntegrityError:
            await session.rollback()
            earlier = await _replay(session, principal, idempotency_key, request_hash)
            if earlier is None:  # the other import's chat is already deleted again
                raise
            return Imported(earlier, replayed=True)
    rows = _message_rows(data.messages, chat_id=chat.id, user_id=principal.user_id, first_seq=1, parent_id=None)
    if rows:
        await session.execute(insert(Message), rows)
    await session.commit()
    return Imported(chat)


def _exported_message(
    role: str, content: str, name: str | None, tool_calls: list[Any] | None, tool_call_id: str | None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": None if tool_calls and not content else content}
    if name is not None:
        message["name"] = name
    if tool_calls:
        message["tool_calls"] = tool_calls
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message


async def export_body(session: AsyncSession, principal: Principal, chat_id: str) -> tuple[Chat, dict[str, Any]]:
    """The caller's chat as a body for `POST /history/import`: its current branch, failed replies (no text) left out."""
    chat = await get_owned_chat(session, principal, chat_id)
    body: dict[str, Any] = {name: getattr(chat, _CHAT_ATTRIBUTES.get(name, name)) for name in ChatCreate.model_fields}
    rows = await session.execute(
        select(Message.role, Message.content, Message.name, Message.tool_calls, Message.tool_call_id)
        .where(Message.chat_id == chat.id, Message.active.is_(True))
        .where((Message.status != "error") | (Message.content != ""))
        .order_by(Message.seq)
    )
    body["messages"] = [_exported_message(*row) for row in rows]
    return chat, body


@dataclass(frozen=True, slots=True)
class ExportFile:
    content: bytes
    media_type: str
    filename: str


async def export_chat(
    session: AsyncSession, principal: Principal, chat_id: str, fmt: Literal["json", "markdown"]
) -> ExportFile:
    """The caller's chat as JSON to import again as it is, or as Markdown that shows every text verbatim."""
    chat, body = await export_body(session, principal, chat_id)
    if fmt == "markdown":
        return ExportFile(render_markdown(chat, body).encode(), "text/markdown; charset=utf-8", f"{chat.id}.md")
    return ExportFile(orjson.dumps(body), "application/json", f"{chat.id}.json")


async def clear_history(session: AsyncSession, principal: Principal, chat_id: str) -> int:
    """Delete the caller's chat's messages (and summaries of them), keeping the chat; returns how many."""
    chat = await get_owned_chat(session, principal, chat_id)
    # The chat's row lock first, then its messages: the order sends and purges take them in.
    await session.execute(update(Chat).where(Chat.id == chat.id).values(message_count=0, updated_at=utcnow()))
    result = cast(CursorResult[Any], await session.execute(delete(Message).where(Message.chat_id == chat.id)))
    await session.execute(delete(ChatSummary).where(ChatSummary.chat_id == chat.id))
    await session.commit()
    return result.rowcount


@dataclass(slots=True)
class PurgeResult:
    messages: int = 0
    batches: int = 0


async def _purge_batch(session: AsyncSession, cutoff: datetime, batch_size: int) -> tuple[int, int]:
    """Purge up to `batch_size` of the oldest messages; returns (looked at, deleted)."""
    candidates = (
        await session.execute(
            select(Message.id, Message.chat_id)
            .where(Message.created_at < cutoff)
            .order_by(Message.created_at)
            .limit(batch_size)
        )
    ).all()
    if not candidates:
        return 0, 0
    chat_ids = sorted({chat_id for _, chat_id in candidates})
    # Chats' row locks first (in a fixed order), then their messages, as sends and clears do.
    await session.execute(select(Chat.id).where(Chat.id.in_(chat_ids)).order_by(Chat.id).with_for_update())
    deleted = (
        await session.execute(
            delete(Message)
            .where(Message.id.in_([message_id for message_id, _ in candidates]), Message.created_at < cutoff)
            .returning(Message.chat_id, Message.seq)
        )
    ).all()
    counts = Counter(chat_id for chat_id, _ in deleted)
    first_deleted: dict[str, int] = {}
    for chat_id, seq in deleted:
        first_deleted[chat_id] = min(seq, first_deleted.get(chat_id, seq))
    for chat_id in sorted(counts):
        await session.execute(
            update(Chat).where(Chat.id == chat_id).values(message_count=Chat.message_count - counts[chat_id])
        )
        # A summary that stands in for a purged message still holds what it said.
        await session.execute(
            delete(ChatSummary).where(ChatSummary.chat_id == chat_id, ChatSummary.up_to_seq >= first_deleted[chat_id])
        )
    await session.commit()
    return len(candidates), len(deleted)


async def purge_history(factory: SessionFactory, older_than: datetime, batch_size: int = 1000) -> PurgeResult:
    """Delete every message created before `older_than`, with what derives from it, one bounded batch at a time."""
    result = PurgeResult()
    while True:
        async with factory() as session:
            seen, deleted = await _purge_batch(session, older_than, batch_size)
        if seen == 0:
            return result
        result.batches += 1
        result.messages += deleted
        if seen < batch_size:
            return result
