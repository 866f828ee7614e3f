"""What of a chat goes to the model.

For now the whole conversation is sent: the chat's system prompt, then every
earlier message that has content (failed replies are left out), oldest first.
"""

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Chat, Message


async def build_context(session: AsyncSession, chat: Chat, before_seq: int) -> list[dict[str, Any]]:
    """The upstream `messages` for a reply at position `before_seq` (exclusive)."""
    messages: list[dict[str, Any]] = []
    if chat.system_prompt:
        messages.append({"role": "system", "content": chat.system_prompt})
    rows = await session.execute(
        select(Message.role, Message.content)
        .where(Message.chat_id == chat.id, Message.seq < before_seq, Message.status != "error", Message.content != "")
        .order_by(Message.seq)
    )
    messages.extend({"role": role, "content": content} for role, content in rows)
    return messages
