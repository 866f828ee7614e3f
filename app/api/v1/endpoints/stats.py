from typing import Annotated

from fastapi import APIRouter, Query

from app.core.security import CurrentPrincipal
from app.db.database import SessionDep
from app.schemas.stats import SummaryQuery, UsagePage, UsageQuery, UsageSummary
from app.services import stats
from app.services.usage import LedgerDep

router = APIRouter(prefix="/stats", tags=["stats"])


@router.get("/usage")
async def read_usage(
    query: Annotated[UsageQuery, Query()], principal: CurrentPrincipal, session: SessionDep, ledger: LedgerDep
) -> UsagePage:
    """Requests, tokens, cost and latency in time buckets, optionally grouped (OpenAI Usage API shape)."""
    await ledger.flush()
    return await stats.usage(session, principal, query)


@router.get("/summary")
async def read_summary(
    query: Annotated[SummaryQuery, Query()], principal: CurrentPrincipal, session: SessionDep, ledger: LedgerDep
) -> UsageSummary:
    """Totals, error rate, latency and time-to-first-token percentiles, top models, unpriced tokens."""
    await ledger.flush()
    return await stats.summary(session, principal, query)
