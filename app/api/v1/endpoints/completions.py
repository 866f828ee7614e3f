"""The OpenAI-compatible API under `/v1`: the official SDK works against it unchanged."""

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from app.core.errors import NotFoundError, ServiceUnavailableError
from app.core.security import CurrentPrincipal
from app.core.streaming import StreamResponse
from app.db.database import SessionDep
from app.schemas.common import Deleted, ListParams, Page
from app.services import stored
from app.services.gateway import Gateway
from app.services.proxy import ProxyDep

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "description": "OpenAI's chat completion body"}}},
    }
}


@router.post("/chat/completions", openapi_extra=JSON_BODY, response_model=None)
async def create_chat_completion(request: Request, principal: CurrentPrincipal) -> Response:
    """Create a chat completion exactly as OpenAI's API does, whole or streamed."""
    # The hot path: one dependency (the key); the rest comes from the app's state.
    started = getattr(request.state, "started", None) or time.perf_counter()
    relay_gateway: Gateway = request.app.state.gateway
    relay = await relay_gateway.chat_completions(await request.body(), principal, started)
    if relay.chunks is not None:
        return StreamResponse(relay.chunks, status_code=relay.status, headers=relay.headers, media_type=None)
    return Response(relay.body, status_code=relay.status, headers=relay.headers)


class MetadataUpdate(BaseModel):
    metadata: dict[str, Any] | None


class StoredListParams(ListParams):
    """OpenAI's stored-completion lists run oldest first unless asked otherwise."""

    order: Literal["asc", "desc"] = "asc"


@router.get("/chat/completions")
async def list_chat_completions(
    request: Request,
    page: Annotated[StoredListParams, Query()],
    principal: CurrentPrincipal,
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=256)] = None,
) -> Page[dict[str, Any]]:
    """List stored chat completions; filter with `model` and `metadata[key]=value`."""
    pairs = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    return await stored.list_stored(session, principal, page, model, stored.validate_metadata(pairs))


@router.get("/chat/completions/{completion_id}")
async def get_chat_completion(completion_id: str, principal: CurrentPrincipal, session: SessionDep) -> dict[str, Any]:
    """Get a stored chat completion."""
    return stored.completion_object(await stored.get_stored(session, principal, completion_id))


@router.post("/chat/completions/{completion_id}")
async def update_chat_completion(
    completion_id: str, data: MetadataUpdate, principal: CurrentPrincipal, session: SessionDep
) -> dict[str, Any]:
    """Replace a stored chat completion's metadata."""
    metadata = stored.validate_metadata(data.metadata)
    return stored.completion_object(await stored.update_metadata(session, principal, completion_id, metadata))


@router.delete("/chat/completions/{completion_id}")
async def delete_chat_completion(completion_id: str, principal: CurrentPrincipal, session: SessionDep) -> Deleted:
    """Delete a stored chat completion."""
    await stored.delete_stored(session, principal, completion_id)
    return Deleted(id=completion_id, object="chat.completion.deleted")


@router.get("/chat/completions/{completion_id}/messages")
async def list_chat_completion_messages(
    completion_id: str,
    page: Annotated[StoredListParams, Query()],
    principal: CurrentPrincipal,
    session: SessionDep,
) -> Page[dict[str, Any]]:
    """The messages of a stored chat completion."""
    return await stored.stored_messages(session, principal, completion_id, page)


async def _visible_models(principal: CurrentPrincipal, proxy: ProxyDep) -> list[dict[str, Any]]:
    if proxy is None:
        raise ServiceUnavailableError("No model provider is configured.", code="upstream_not_configured")
    listing = orjson.loads(await proxy.models())
    models = [m for m in listing.get("data", []) if isinstance(m, dict)]
    if principal.allowed_models is not None:
        models = [m for m in models if m.get("id") in principal.allowed_models]
    return models


@router.get("/models")
async def list_models(principal: CurrentPrincipal, proxy: ProxyDep) -> dict[str, Any]:
    """The models this key may use."""
    return {"object": "list", "data": await _visible_models(principal, proxy)}


@router.get("/models/{model:path}")
async def get_model(model: str, principal: CurrentPrincipal, proxy: ProxyDep) -> dict[str, Any]:
    """One model, if this key may use it."""
    for entry in await _visible_models(principal, proxy):
        if entry.get("id") == model:
            return entry
    raise NotFoundError(
        f"The model '{model}' does not exist or you do not have access to it.", param="model", code="model_not_found"
    )
