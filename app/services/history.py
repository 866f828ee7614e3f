"""Reading a chat's stored messages."""

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.security import Principal
from app.db.models import Message
from app.schemas.chat import MessageRead
from app.schemas.common import ListParams, Page
from app.services.chats import get_owned_chat
from app.services.messages import message_read
from app.services.pagination import cursor_values, paginate


async def read_messages(
    session: AsyncSession, principal: Principal, chat_id: str, page: ListParams
) -> Page[MessageRead]:
    """A page of the caller's chat, in the order the messages were sent."""
    chat = await get_owned_chat(session, principal, chat_id)
    keys = (Message.seq,)
    cursor = await cursor_values(
        session, select(Message.seq).where(Message.id == page.after, Message.chat_id == chat.id), page.after
    )
    stmt = select(Message).where(Message.chat_id == chat.id)
    return await paginate(session, stmt, keys, page, cursor, message_read, lambda m: m.id)
