from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse

from app.core.config import SettingsDep
from app.core.security import CurrentPrincipal
from app.db.database import SessionDep, SessionFactoryDep
from app.schemas.chat import ChatCreate, ChatListParams, ChatRead, ChatUpdate, MessageCreate, SendResult
from app.schemas.common import Deleted, ListParams, Page
from app.services import chats, messages
from app.services.openai import UpstreamDep
from app.services.usage import AccountingDep

router = APIRouter(prefix="/chats", tags=["chats"])

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_chat(
    data: ChatCreate, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> ChatRead:
    """Create a chat."""
    return chats.chat_read(await chats.create_chat(session, principal, data), settings.default_model)


@router.get("")
async def list_chats(
    page: Annotated[ListParams, Query()],
    filters: Annotated[ChatListParams, Query()],
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> Page[ChatRead]:
    """List the caller's chats, newest first; filter by archived, pinned, tag or words in the title."""
    return await chats.list_chats(session, principal, page, filters, settings.default_model)


@router.get("/{chat_id}")
async def get_chat(chat_id: str, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep) -> ChatRead:
    """Read a chat."""
    return chats.chat_read(await chats.get_owned_chat(session, principal, chat_id), settings.default_model)


@router.patch("/{chat_id}")
async def update_chat(
    chat_id: str, data: ChatUpdate, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> ChatRead:
    """Rename a chat, change its model, prompt or params, archive, pin, tag or annotate it."""
    return chats.chat_read(await chats.update_chat(session, principal, chat_id, data), settings.default_model)


@router.delete("/{chat_id}")
async def delete_chat(chat_id: str, principal: CurrentPrincipal, session: SessionDep) -> Deleted:
    """Delete a chat and its messages."""
    await chats.delete_chat(session, principal, chat_id)
    return Deleted(id=chat_id, object="chat.deleted")


@router.post(
    "/{chat_id}/messages",
    response_model=SendResult,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`, SSE events."}},
)
async def send_message(
    chat_id: str,
    data: MessageCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    factory: SessionFactoryDep,
    upstream: UpstreamDep,
    accounting: AccountingDep,
    settings: SettingsDep,
) -> SendResult | StreamingResponse:
    """Send a message and get the model's reply, whole or (with `stream: true`) as server-sent events."""
    if data.stream:
        events = await messages.start_stream(session, upstream, accounting, factory, principal, chat_id, data, settings)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    return await messages.send_message(session, upstream, accounting, principal, chat_id, data, settings)
