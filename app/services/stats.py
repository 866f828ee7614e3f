"""Usage statistics from the ledger, scoped to the caller.

Buckets start at `start_time` and are `bucket_width` long; every bucket of the
range is present, with an empty `results` list when nothing happened in it.
Percentiles are `percentile_cont` (linear interpolation): computed by
PostgreSQL itself there, and with the same formula here for SQLite.
"""

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, Select, and_, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import InvalidRequestError, PermissionDeniedError
from app.core.security import Principal
from app.db.models import UsageRecord as U
from app.schemas.stats import (
    BUCKET_LIMITS,
    BUCKET_SECONDS,
    ModelTotals,
    Percentiles,
    SummaryQuery,
    UnpricedTokens,
    UsageBucket,
    UsagePage,
    UsageQuery,
    UsageResult,
    UsageSummary,
)

DEFAULT_RANGE_SECONDS = 7 * 86400
GROUP_COLUMNS = {"model": U.model, "user_id": U.user_id, "api_key_id": U.api_key_id, "chat_id": U.chat_id}


def percentile(values: Sequence[float], q: float) -> float | None:
    """`percentile_cont(q)` of sorted values."""
    if not values:
        return None
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def _csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _window(start_time: int | None, end_time: int | None) -> tuple[int, int]:
    # Now, rounded up: end_time is exclusive and whole seconds, and this second's calls count.
    end = end_time if end_time is not None else int(time.time()) + 1
    start = start_time if start_time is not None else end - DEFAULT_RANGE_SECONDS
    if start >= end:
        raise InvalidRequestError("start_time must be before end_time.", param="start_time")
    return start, end


def _scope(principal: Principal, user_ids: str | None) -> list[ColumnElement[bool]]:
    """A user sees their own usage; an admin sees everyone's, optionally filtered by user."""
    wanted = _csv(user_ids)
    if not principal.is_admin:
        if wanted and wanted != [principal.user_id]:
            raise PermissionDeniedError("Only admins can read other users' usage.", param="user_ids")
        return [U.user_id == principal.user_id]
    return [U.user_id.in_(wanted)] if wanted else []


def _epoch(session: AsyncSession) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", U.created_at)), BigInteger)
    return cast(func.strftime("%s", U.created_at), Integer)


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _totals() -> list[Any]:
    return [
        func.count().label("requests"),
        func.coalesce(func.sum(case((U.status_code >= 400, 1), else_=0)), 0).label("errors"),
        func.coalesce(func.sum(U.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(U.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(U.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(U.reasoning_tokens), 0).label("reasoning_tokens"),
        func.coalesce(func.sum(case((U.source == "estimated", 1), else_=0)), 0).label("estimated"),
        func.coalesce(func.sum(U.cost_usd), 0).label("cost"),
        func.coalesce(func.sum(case((U.cost_usd.is_(None), 1), else_=0)), 0).label("unpriced"),
    ]


def _pg_percentiles(column: Any, qs: Sequence[float]) -> list[Any]:
    return [func.percentile_cont(q).within_group(column.asc()).label(f"p{round(q * 100)}") for q in qs]


async def usage(session: AsyncSession, principal: Principal, query: UsageQuery) -> UsagePage:
    """Usage in time buckets, optionally grouped, one page of buckets at a time."""
    start, end = _window(query.start_time, query.end_time)
    width = BUCKET_SECONDS[query.bucket_width]
    default_limit, max_limit = BUCKET_LIMITS[query.bucket_width]
    limit = query.limit or default_limit
    if limit > max_limit:
        raise InvalidRequestError(
            f"limit must be at most {max_limit} for bucket_width {query.bucket_width}.", param="limit"
        )
    groups = _csv(query.group_by)
    if unknown := [g for g in groups if g not in GROUP_COLUMNS]:
        raise InvalidRequestError(
            f"Unknown group_by value {unknown[0]!r}; use any of {', '.join(GROUP_COLUMNS)}.", param="group_by"
        )
    page_start = start
    if query.page is not None:
        if not query.page.isdigit() or not start <= int(query.page) < end or (int(query.page) - start) % width:
            raise InvalidRequestError("Invalid page token.", param="page", code="invalid_cursor")
        page_start = int(query.page)
    page_end = min(page_start + limit * width, end)

    filters = [*_scope(principal, query.user_ids)]
    for name, column in (("models", U.model), ("api_key_ids", U.api_key_id), ("chat_ids", U.chat_id)):
        if values := _csv(getattr(query, name)):
            filters.append(column.in_(values))
    in_page = and_(
        U.created_at >= _utc(page_start),
        U.created_at < _utc(page_end),
        *filters,
    )
    bucket = ((_epoch(session) - page_start) // width).label("bucket")
    group_columns = [GROUP_COLUMNS[g].label(g) for g in groups]
    columns: list[Any] = [bucket, *group_columns, *_totals()]
    if _is_postgres(session):
        columns += _pg_percentiles(U.latency_ms, (0.5, 0.95))
    stmt: Select[Any] = (
        select(*columns).where(in_page).group_by(bucket, *group_columns).order_by(bucket, *group_columns)
    )
    rows = (await session.execute(stmt)).mappings().all()

    latencies: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    if not _is_postgres(session):
        lat_stmt = select(bucket, *group_columns, U.latency_ms).where(in_page).order_by(U.latency_ms)
        for row in (await session.execute(lat_stmt)).all():
            latencies[tuple(row[:-1])].append(row[-1])

    by_bucket: dict[int, list[UsageResult]] = defaultdict(list)
    for row in rows:
        key = (row["bucket"], *(row[g] for g in groups))
        if _is_postgres(session):
            p50, p95 = row["p50"], row["p95"]
        else:
            p50, p95 = percentile(latencies[key], 0.5), percentile(latencies[key], 0.95)
        by_bucket[int(row["bucket"])].append(
            UsageResult(
                requests=row["requests"],
                errors=row["errors"],
                input_tokens=row["input_tokens"],
                output_tokens=row["output_tokens"],
                input_cached_tokens=row["cached_tokens"],
                reasoning_tokens=row["reasoning_tokens"],
                estimated_requests=row["estimated"],
                cost_usd=_money(row["cost"]),
                unpriced_requests=row["unpriced"],
                latency_ms_p50=_ms(p50),
                latency_ms_p95=_ms(p95),
                **{g: row[g] for g in groups},
            )
        )
    buckets = [
        UsageBucket(start_time=s, end_time=min(s + width, end), results=by_bucket.get((s - page_start) // width, []))
        for s in range(page_start, page_end, width)
    ]
    has_more = page_end < end
    return UsagePage(data=buckets, has_more=has_more, next_page=str(page_end) if has_more else None)


async def summary(session: AsyncSession, principal: Principal, query: SummaryQuery) -> UsageSummary:
    """Totals, error rate, latency and time-to-first-token percentiles, top models, unpriced tokens."""
    start, end = _window(query.start_time, query.end_time)
    where = and_(U.created_at >= _utc(start), U.created_at < _utc(end), *_scope(principal, query.user_ids))
    qs = (0.5, 0.95, 0.99)
    if _is_postgres(session):
        lat_cols = _pg_percentiles(U.latency_ms, qs)
        ttft_cols = [c.label(f"t{c.name}") for c in _pg_percentiles(U.ttft_ms, qs)]
        row = (await session.execute(select(*_totals(), *lat_cols, *ttft_cols).where(where))).mappings().one()
        latency = Percentiles(p50=_ms(row["p50"]), p95=_ms(row["p95"]), p99=_ms(row["p99"]))
        ttft = Percentiles(p50=_ms(row["tp50"]), p95=_ms(row["tp95"]), p99=_ms(row["tp99"]))
    else:
        row = (await session.execute(select(*_totals()).where(where))).mappings().one()
        lat = list((await session.scalars(select(U.latency_ms).where(where).order_by(U.latency_ms))).all())
        first = list(
            (await session.scalars(select(U.ttft_ms).where(where, U.ttft_ms.is_not(None)).order_by(U.ttft_ms))).all()
        )
        latency = Percentiles(**{f"p{round(q * 100)}": _ms(percentile(lat, q)) for q in qs})
        ttft = Percentiles(
            **{f"p{round(q * 100)}": _ms(percentile([t for t in first if t is not None], q)) for q in qs}
        )

    top = (
        await session.execute(
            select(
                U.model,
                func.count().label("requests"),
                func.sum(U.input_tokens).label("input_tokens"),
                func.sum(U.output_tokens).label("output_tokens"),
                func.coalesce(func.sum(U.cost_usd), 0).label("cost"),
            )
            .where(where)
            .group_by(U.model)
            .order_by(func.count().desc(), U.model)
            .limit(10)
        )
    ).all()
    unpriced = (
        await session.execute(
            select(U.model, func.sum(U.input_tokens), func.sum(U.output_tokens))
            .where(where, U.cost_usd.is_(None), (U.input_tokens + U.output_tokens) > 0)
            .group_by(U.model)
            .order_by(U.model)
        )
    ).all()
    requests = int(row["requests"])
    return UsageSummary(
        start_time=start,
        end_time=end,
        requests=requests,
        errors=row["errors"],
        error_rate=round(row["errors"] / requests, 6) if requests else 0.0,
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        input_cached_tokens=row["cached_tokens"],
        reasoning_tokens=row["reasoning_tokens"],
        estimated_requests=row["estimated"],
        cost_usd=_money(row["cost"]),
        latency_ms=latency,
        time_to_first_token_ms=ttft,
        top_models=[
            ModelTotals(model=m, requests=r, input_tokens=i, output_tokens=o, cost_usd=_money(c))
            for m, r, i, o, c in top
        ],
        unpriced=[UnpricedTokens(model=m, input_tokens=i, output_tokens=o) for m, i, o in unpriced],
    )


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _money(value: Decimal | float | int | None) -> float:
    return round(float(value or 0), 10)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
