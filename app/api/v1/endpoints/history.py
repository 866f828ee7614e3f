from typing import Annotated

from fastapi import APIRouter, Query

from app.core.security import CurrentPrincipal
from app.db.database import SessionDep
from app.schemas.chat import MessageRead
from app.schemas.common import Page
from app.schemas.history import HistoryParams
from app.services import history

router = APIRouter(prefix="/history", tags=["history"])


@router.get("/{chat_id}")
async def read_history(
    chat_id: str, page: Annotated[HistoryParams, Query()], principal: CurrentPrincipal, session: SessionDep
) -> Page[MessageRead]:
    """A chat's messages, oldest first by default, one page at a time."""
    return await history.read_messages(session, principal, chat_id, page)
