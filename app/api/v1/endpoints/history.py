from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.core.security import CurrentPrincipal
from app.db.database import SessionDep
from app.schemas.chat import ChatRead, MessageRead
from app.schemas.common import Page
from app.schemas.history import (
    ExportParams,
    HistoryCleared,
    HistoryImport,
    HistoryParams,
    HistorySave,
    SearchParams,
    SearchResults,
)
from app.services import chats, history, search
from app.services.runtime import ChatRuntimeDep

router = APIRouter(prefix="/history", tags=["history"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Retrying with the same key returns the chat the first request made, without a second copy",
    ),
]

# Declared before `/{chat_id}` so that "search" and "import" are never taken for chat ids.


@router.get("/search")
async def search_history(
    params: Annotated[SearchParams, Query()], principal: CurrentPrincipal, session: SessionDep
) -> SearchResults:
    """Find the caller's messages and chat titles that contain every word of `q`, best first."""
    return await search.search_history(session, principal, params)


@router.post("/import", status_code=status.HTTP_201_CREATED)
async def import_chat(
    data: HistoryImport,
    principal: CurrentPrincipal,
    session: SessionDep,
    runtime: ChatRuntimeDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ChatRead:
    """Create a chat from a whole transcript in OpenAI's `messages` format, all or nothing."""
    imported = await history.import_chat(session, principal, data, idempotency_key)
    if imported.replayed:
        response.headers["idempotent-replayed"] = "true"
    return chats.chat_read(imported.chat, runtime)


@router.get(
    "/{chat_id}/export",
    response_model=HistoryImport,
    responses={200: {"content": {"text/markdown": {}}, "description": "JSON for re-import, or Markdown"}},
)
async def export_chat(
    chat_id: str, params: Annotated[ExportParams, Query()], principal: CurrentPrincipal, session: SessionDep
) -> Response:
    """Export a chat: JSON that the import route takes as it is, or Markdown for reading."""
    file = await history.export_chat(session, principal, chat_id, params.format)
    disposition = f'attachment; filename="{file.filename}"'
    return Response(file.content, media_type=file.media_type, headers={"content-disposition": disposition})


@router.get("/{chat_id}")
async def read_history(
    chat_id: str, page: Annotated[HistoryParams, Query()], principal: CurrentPrincipal, session: SessionDep
) -> Page[MessageRead]:
    """A chat's messages, oldest first by default, one page at a time."""
    return await history.read_messages(session, principal, chat_id, page)


@router.post("/{chat_id}", status_code=status.HTTP_201_CREATED)
async def save_messages(
    chat_id: str, data: HistorySave, principal: CurrentPrincipal, session: SessionDep
) -> Page[MessageRead]:
    """Append messages made elsewhere to a chat, without calling the model."""
    return await history.save_messages(session, principal, chat_id, data)


@router.delete("/{chat_id}")
async def clear_history(chat_id: str, principal: CurrentPrincipal, session: SessionDep) -> HistoryCleared:
    """Delete a chat's messages and keep the chat."""
    deleted = await history.clear_history(session, principal, chat_id)
    return HistoryCleared(id=chat_id, deleted_messages=deleted)
