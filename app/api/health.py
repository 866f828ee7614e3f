from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.core.metrics import CONTENT_TYPE
from app.db.migrations import current_revision

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> JSONResponse:
    """The database answers and its schema is the newest; 503 otherwise."""
    try:
        revision = await current_revision(request.app.state.engine)
    except Exception as exc:  # any failure to reach the database means "not ready"
        return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, status_code=503)
    head = request.app.state.schema_head
    if revision != head:
        return JSONResponse(
            {"status": "unavailable", "database": "ok", "migrations": {"current": revision, "head": head}},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok", "migrations": {"current": revision, "head": head}})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: HTTP requests, upstream calls, tokens, cost, latency histograms."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
