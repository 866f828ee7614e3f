from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.core.security import CurrentPrincipal
from app.core.streaming import StreamResponse
from app.db.database import SessionDep
from app.db.models import Message
from app.schemas.chat import (
    ChatCreate,
    ChatListParams,
    ChatRead,
    ChatUpdate,
    MessageCreate,
    MessageRead,
    MessageUpdate,
    RegenerateRequest,
    SendResult,
)
from app.schemas.common import Deleted, ListParams, Page
from app.schemas.context import ContextRead
from app.services import chats, messages
from app.services.runtime import ChatRuntimeDep

router = APIRouter(prefix="/chats", tags=["chats"])

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_chat(
    data: ChatCreate, principal: CurrentPrincipal, session: SessionDep, runtime: ChatRuntimeDep
) -> ChatRead:
    """Create a chat."""
    return chats.chat_read(await chats.create_chat(session, principal, data), runtime)


@router.get("")
async def list_chats(
    page: Annotated[ListParams, Query()],
    filters: Annotated[ChatListParams, Query()],
    principal: CurrentPrincipal,
    session: SessionDep,
    runtime: ChatRuntimeDep,
) -> Page[ChatRead]:
    """List the caller's chats, newest first; filter by archived, pinned, tag or words in the title."""
    return await chats.list_chats(session, principal, page, filters, runtime)


@router.get("/{chat_id}")
async def get_chat(chat_id: str, principal: CurrentPrincipal, session: SessionDep, runtime: ChatRuntimeDep) -> ChatRead:
    """Read a chat."""
    return chats.chat_read(await chats.get_owned_chat(session, principal, chat_id), runtime)


@router.patch("/{chat_id}")
async def update_chat(
    chat_id: str, data: ChatUpdate, principal: CurrentPrincipal, session: SessionDep, runtime: ChatRuntimeDep
) -> ChatRead:
    """Rename a chat; change its model, prompt, instructions, params or context strategy; archive, pin, tag it."""
    return chats.chat_read(await chats.update_chat(session, principal, chat_id, data), runtime)


@router.delete("/{chat_id}")
async def delete_chat(chat_id: str, principal: CurrentPrincipal, session: SessionDep) -> Deleted:
    """Delete a chat and its messages."""
    await chats.delete_chat(session, principal, chat_id)
    return Deleted(id=chat_id, object="chat.deleted")


@router.get("/{chat_id}/context")
async def preview_context(
    chat_id: str, principal: CurrentPrincipal, session: SessionDep, runtime: ChatRuntimeDep
) -> ContextRead:
    """Dry run of the next send's context: each message with its tokens, what is left out and why, the budget."""
    return await chats.context_preview(session, runtime, principal, chat_id)


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
    runtime: ChatRuntimeDep,
) -> SendResult | StreamResponse:
    """Send a message and get the model's reply, whole or (with `stream: true`) as server-sent events."""
    if data.stream:
        events = await messages.start_stream(session, runtime, principal, chat_id, data)
        return StreamResponse(events, headers=SSE_HEADERS)
    return await messages.send_message(session, runtime, principal, chat_id, data)


@router.patch(
    "/{chat_id}/messages/{message_id}",
    response_model=MessageRead | SendResult,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `reply` and `stream`, SSE events."}},
)
async def update_message(
    chat_id: str,
    message_id: str,
    data: MessageUpdate,
    principal: CurrentPrincipal,
    session: SessionDep,
    runtime: ChatRuntimeDep,
) -> MessageRead | SendResult | StreamResponse:
    """Pin or unpin a message; new content for a user message makes a sibling branch (`reply` answers it)."""
    result = await messages.edit_message(session, runtime, principal, chat_id, message_id, data)
    return _respond(result)


@router.post(
    "/{chat_id}/messages/{message_id}/regenerate",
    response_model=SendResult,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`, SSE events."}},
)
async def regenerate_reply(
    chat_id: str,
    message_id: str,
    data: RegenerateRequest,
    principal: CurrentPrincipal,
    session: SessionDep,
    runtime: ChatRuntimeDep,
) -> SendResult | StreamResponse:
    """A new reply to the same turn, as a sibling of this one (which leaves the current branch)."""
    result = await messages.regenerate(session, runtime, principal, chat_id, message_id, data)
    if isinstance(result, SendResult):
        return result
    return StreamResponse(result, headers=SSE_HEADERS)


def _respond(result: Message | SendResult | AsyncIterator[bytes]) -> MessageRead | SendResult | StreamResponse:
    if isinstance(result, Message):
        return messages.message_read(result)
    if isinstance(result, SendResult):
        return result
    return StreamResponse(result, headers=SSE_HEADERS)
