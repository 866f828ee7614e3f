"""The long-lived collaborators of the chat services, built once in the app's lifespan."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.db.database import SessionFactory
from app.services.context import ContextBuilder
from app.services.limits import Limiter
from app.services.openai import Upstream
from app.services.usage import Accounting


@dataclass(frozen=True, slots=True)
class ChatRuntime:
    """What sending needs besides the request's session: the model provider, accounting, context."""

    upstream: Upstream | None
    accounting: Accounting
    context: ContextBuilder
    factory: SessionFactory
    default_model: str
    limiter: Limiter

    @property
    def default_strategy(self) -> str:
        return self.context.settings.context_strategy


async def app_runtime(request: Request) -> ChatRuntime:
    runtime: ChatRuntime = request.app.state.runtime
    return runtime


ChatRuntimeDep = Annotated[ChatRuntime, Depends(app_runtime)]
