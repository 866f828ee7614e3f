"""Stored chat completions (`"store": true` on `/v1/chat/completions`), always scoped to their owner."""

from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import InvalidRequestError, NotFoundError
from app.core.security import Principal
from app.db.models import StoredCompletion, utcnow
from app.schemas.common import ListParams, Metadata, Page
from app.services.pagination import cursor_values, paginate

_METADATA = TypeAdapter(Metadata)


def validate_metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata rules: up to 16 string pairs, keys up to 64 characters, values up to 512."""
    try:
        return _METADATA.validate_python(value or {})
    except ValidationError as exc:
        raise InvalidRequestError(f"Invalid 'metadata': {exc.errors()[0]['msg']}.", param="metadata") from None


def completion_object(stored: StoredCompletion) -> dict[str, Any]:
    return {**stored.response, "metadata": stored.metadata_, "request_id": None}


async def save_completion(
    session: AsyncSession,
    principal: Principal,
    request: dict[str, Any],
    response: dict[str, Any],
    metadata: dict[str, str],
) -> None:
    """Keep a completion and the request that made it."""
    session.add(
        StoredCompletion(
            id=str(response["id"]),
            user_id=principal.user_id,
            api_key_id=principal.key_id,
            model=str(response.get("model") or request.get("model")),
            metadata_=metadata,
            request=request,
            response=response,
            created_at=utcnow(),
        )
    )
    await session.commit()


async def get_stored(session: AsyncSession, principal: Principal, completion_id: str) -> StoredCompletion:
    """The caller's stored completion, or a 404."""
    stored = await session.scalar(
        select(StoredCompletion).where(
            StoredCompletion.id == completion_id, StoredCompletion.user_id == principal.user_id
        )
    )
    if stored is None:
        raise NotFoundError(f"No chat completion found with id '{completion_id}'.", param="completion_id")
    return stored


async def list_stored(
    session: AsyncSession, principal: Principal, page: ListParams, model: str | None, metadata: dict[str, str]
) -> Page[dict[str, Any]]:
    """The caller's stored completions, filtered by model and metadata pairs."""
    stmt = select(StoredCompletion).where(StoredCompletion.user_id == principal.user_id)
    if model:
        stmt = stmt.where(StoredCompletion.model == model)
    keys = (StoredCompletion.created_at, StoredCompletion.id)
    cursor = await cursor_values(
        session,
        select(*keys).where(StoredCompletion.id == page.after, StoredCompletion.user_id == principal.user_id),
        page.after,
    )
    if not metadata:
        return await paginate(session, stmt, keys, page, cursor, completion_object, lambda c: str(c["id"]))
    # Metadata is a handful of pairs per row: filter in Python, reading pages of rows until one is full.
    items: list[dict[str, Any]] = []
    has_more = False
    scan = page.model_copy(update={"limit": 100})
    while True:
        batch = await paginate(session, stmt, keys, scan, cursor, lambda c: c, lambda c: c.id)
        for row in batch.data:
            if all(row.metadata_.get(k) == v for k, v in metadata.items()):
                if len(items) == page.limit:
                    has_more = True
                    break
                items.append(completion_object(row))
        if has_more or not batch.has_more or not batch.data:
            break
        last = batch.data[-1]
        cursor = (last.created_at, last.id)
    return Page[dict[str, Any]](
        data=items,
        first_id=str(items[0]["id"]) if items else None,
        last_id=str(items[-1]["id"]) if items else None,
        has_more=has_more,
    )


async def update_metadata(
    session: AsyncSession, principal: Principal, completion_id: str, metadata: dict[str, str]
) -> StoredCompletion:
    """Replace a stored completion's metadata."""
    stored = await get_stored(session, principal, completion_id)
    stored.metadata_ = metadata
    await session.commit()
    return stored


async def delete_stored(session: AsyncSession, principal: Principal, completion_id: str) -> None:
    """Forget a stored completion."""
    stored = await get_stored(session, principal, completion_id)
    await session.delete(stored)
    await session.commit()


async def stored_messages(
    session: AsyncSession, principal: Principal, completion_id: str, page: ListParams
) -> Page[dict[str, Any]]:
    """The messages of the request behind a stored completion, paged."""
    stored = await get_stored(session, principal, completion_id)
    messages = [
        _store_message(f"{stored.id}-{i}", m)
        for i, m in enumerate(stored.request.get("messages", []))
        if isinstance(m, dict)
    ]
    if page.order == "desc":
        messages.reverse()
    start = 0
    if page.after is not None:
        ids = [m["id"] for m in messages]
        if page.after not in ids:
            raise InvalidRequestError(f"No such message for cursor 'after': {page.after!r}.", param="after")
        start = ids.index(page.after) + 1
    data = messages[start : start + page.limit]
    return Page[dict[str, Any]](
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=start + page.limit < len(messages),
    )


def _store_message(message_id: str, message: dict[str, Any]) -> dict[str, Any]:
    """A request message as OpenAI lists it: `content` as text, the parts (text, image) in `content_parts`."""
    content = message.get("content")
    parts: list[Any] | None = None
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") in ("text", "image_url")]
        texts = [str(p.get("text", "")) for p in parts if p["type"] == "text"]
        content = "\n".join(texts) if texts else None
    out = {
        "id": message_id,
        "role": message.get("role"),
        "content": content,
        "name": message.get("name"),
        "content_parts": parts,
    }
    if "tool_calls" in message:
        out["tool_calls"] = message["tool_calls"]
    return out
