"""Usage statistics from the ledger and its rollups, scoped to the caller.

Buckets start at `start_time` and are `bucket_width` long; every bucket of the
range is present, with an empty `results` list when nothing happened in it.

Where the numbers come from (each answer's `latency_percentiles` says which way it went):
- `histogram`: whole UTC days and hours that lie inside one bucket are read from
  `usage_rollups` (per-hour and per-day sums written with the ledger rows, see
  `app.services.usage.record_usage`), and only what is left, less than an hour on either
  side of a bucket boundary that is not on the hour, from the ledger. Counts, tokens and
  cost are exactly the ledger's. Latency and time-to-first-token percentiles come from the
  rollups' log-scale histograms: within one bin of the true value, so at most 20% off (under
  1 ms: at most 1 ms off; from about 10 minutes up, that lower bound is reported).
- `exact`: 1-minute buckets, `chat_id` grouping or filters, and ranges with no whole hour
  inside a bucket are read from the ledger alone, with exact percentiles: `percentile_cont`
  (linear interpolation), computed by PostgreSQL itself there, and with the same formula here
  for SQLite.
"""

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, and_, case, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import InvalidRequestError, PermissionDeniedError
from app.core.security import Principal
from app.db.models import (
    HISTOGRAM_BINS,
    HISTOGRAM_BOUNDS_MS,
    LATENCY_BINS,
    ROLLUP_COUNTERS,
    ROLLUP_PERIODS,
    TTFT_BINS,
    usage_rollups,
)
from app.db.models import UsageRecord as U
from app.schemas.stats import (
    BUCKET_LIMITS,
    BUCKET_SECONDS,
    ModelTotals,
    Percentiles,
    PercentileSource,
    SummaryQuery,
    UnpricedTokens,
    UsageBucket,
    UsagePage,
    UsageQuery,
    UsageResult,
    UsageSummary,
)
from app.services.usage import histogram_bin

DEFAULT_RANGE_SECONDS = 7 * 86400
GROUP_COLUMNS = {"model": U.model, "user_id": U.user_id, "api_key_id": U.api_key_id, "chat_id": U.chat_id}
R = usage_rollups.c
ROLLUP_GROUP_COLUMNS = {"model": R.model, "user_id": R.user_id, "api_key_id": R.api_key_id}
HOUR, DAY = ROLLUP_PERIODS
SUMMARY_QS = (0.5, 0.95, 0.99)
USAGE_QS = (0.5, 0.95)

Key = tuple[Any, ...]
Range = tuple[int, int, int]  # (rollup period, or 0 for the ledger; start; end), Unix seconds


def percentile(values: Sequence[float], q: float) -> float | None:
    """`percentile_cont(q)` of sorted values."""
    if not values:
        return None
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def histogram_percentile(counts: Sequence[int], q: float) -> float | None:
    """`percentile_cont(q)` estimated from rollup histogram counts: each value is placed within its
    bin by its rank (log-linearly), so the estimate lies in the true value's bin."""
    total = sum(counts)
    if not total:
        return None
    position = (total - 1) * q
    low, high = math.floor(position), math.ceil(position)
    first = _order_statistic(counts, low)
    return first + (_order_statistic(counts, high) - first) * (position - low)


def _order_statistic(counts: Sequence[int], rank: int) -> float:
    seen = 0
    for index, count in enumerate(counts):
        if rank < seen + count:
            share = (rank - seen + 0.5) / count
            if index == 0:
                return share * HISTOGRAM_BOUNDS_MS[0]
            lower = HISTOGRAM_BOUNDS_MS[index - 1]
            if index == len(HISTOGRAM_BOUNDS_MS):
                return lower  # the open-ended last bin
            return float(lower * (HISTOGRAM_BOUNDS_MS[index] / lower) ** share)
        seen += count
    raise ValueError("rank beyond the histogram's count")


def split_range(start: int, end: int, width: int) -> tuple[list[Range], list[Range]]:
    """Which parts of [start, end), cut into `width`-second buckets, the rollups can answer.

    A rollup row can be used when its whole period lies inside one bucket: whole days where a
    bucket holds any, whole hours around them, and the ledger for the rest (under an hour at
    either end of each bucket). Returns the rollup ranges (`period_start` from start to end) and
    the ledger ranges, each merged where they touch.
    """
    rollups: list[Range] = []
    ledger: list[Range] = []
    for bucket_start in range(start, end, width) if width >= HOUR else ():
        bucket_end = min(bucket_start + width, end)
        first_hour, last_hour = -(-bucket_start // HOUR) * HOUR, bucket_end // HOUR * HOUR
        if first_hour >= last_hour:
            ledger.append((0, bucket_start, bucket_end))
            continue
        first_day, last_day = -(-first_hour // DAY) * DAY, last_hour // DAY * DAY
        if first_day < last_day:
            rollups += [(HOUR, first_hour, first_day), (DAY, first_day, last_day), (HOUR, last_day, last_hour)]
        else:
            rollups.append((HOUR, first_hour, last_hour))
        ledger += [(0, bucket_start, first_hour), (0, last_hour, bucket_end)]
    if width < HOUR:
        ledger.append((0, start, end))
    return _merge(rollups), _merge(ledger)


def _merge(ranges: Iterable[Range]) -> list[Range]:
    merged: list[Range] = []
    for period, start, end in sorted(r for r in ranges if r[1] < r[2]):
        if merged and merged[-1][0] == period and merged[-1][2] == start:
            merged[-1] = (period, merged[-1][1], end)
        else:
            merged.append((period, start, end))
    return merged


@dataclass(slots=True)
class _Sums:
    """The ledger's sums for one group (the rollup's counters), with histograms or exact percentiles."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced: int = 0
    unpriced_input_tokens: int = 0
    unpriced_output_tokens: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    ttft: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    exact: dict[str, float | None] = field(default_factory=dict)

    def add(self, counters: Sequence[Any]) -> None:
        """Add sums given in ROLLUP_COUNTERS order."""
        for name, value in zip(ROLLUP_COUNTERS, counters, strict=True):
            if name == "cost_usd":
                self.cost_usd += value if isinstance(value, Decimal) else Decimal(str(value or 0))
            else:
                setattr(self, name, getattr(self, name) + int(value or 0))

    def add_histograms(self, latency: Sequence[int], ttft: Sequence[int]) -> None:
        self.latency = [a + int(b) for a, b in zip(self.latency, latency, strict=True)]
        if ttft:
            self.ttft = [a + int(b) for a, b in zip(self.ttft, ttft, strict=True)]

    def merge(self, other: "_Sums") -> None:
        for name in ROLLUP_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency = [a + b for a, b in zip(self.latency, other.latency, strict=True)]
        self.ttft = [a + b for a, b in zip(self.ttft, other.ttft, strict=True)]


def _csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _window(start_time: int | None, end_time: int | None) -> tuple[int, int]:
    # Now, rounded up: end_time is exclusive and whole seconds, and this second's calls count.
    end = end_time if end_time is not None else int(time.time()) + 1
    start = start_time if start_time is not None else end - DEFAULT_RANGE_SECONDS
    if start >= end:
        raise InvalidRequestError("start_time must be before end_time.", param="start_time")
    return start, end


def _scope(principal: Principal, user_ids: str | None, column: Any) -> list[ColumnElement[bool]]:
    """A user sees their own usage; an admin sees everyone's, optionally filtered by user."""
    wanted = _csv(user_ids)
    if not principal.is_admin:
        if wanted and wanted != [principal.user_id]:
            raise PermissionDeniedError("Only admins can read other users' usage.", param="user_ids")
        return [column == principal.user_id]
    return [column.in_(wanted)] if wanted else []


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _epoch(session: AsyncSession) -> ColumnElement[Any]:
    if _is_postgres(session):
        return cast(func.floor(func.extract("epoch", U.created_at)), BigInteger)
    return cast(func.strftime("%s", U.created_at), Integer)


def _ledger_sums() -> list[Any]:
    """The rollup's counters, summed over ledger rows."""
    unpriced = U.cost_usd.is_(None)
    return [
        func.count().label("requests"),
        func.sum(case((U.status_code >= 400, 1), else_=0)).label("errors"),
        func.sum(U.input_tokens).label("input_tokens"),
        func.sum(U.output_tokens).label("output_tokens"),
        func.sum(U.cached_tokens).label("cached_tokens"),
        func.sum(U.reasoning_tokens).label("reasoning_tokens"),
        func.sum(case((U.source == "estimated", 1), else_=0)).label("estimated"),
        func.sum(U.cost_usd).label("cost_usd"),
        func.sum(case((unpriced, 1), else_=0)).label("unpriced"),
        func.sum(case((unpriced, U.input_tokens), else_=0)).label("unpriced_input_tokens"),
        func.sum(case((unpriced, U.output_tokens), else_=0)).label("unpriced_output_tokens"),
    ]


def _ledger_in(ranges: Sequence[Range]) -> ColumnElement[bool]:
    return or_(*(and_(U.created_at >= _utc(start), U.created_at < _utc(end)) for _, start, end in ranges))


def _rollups_in(ranges: Sequence[Range]) -> ColumnElement[bool]:
    return or_(*(and_(R.period == p, R.period_start >= start, R.period_start < end) for p, start, end in ranges))


@dataclass(slots=True)
class _Query:
    """One question to both sources: its ranges, filters and group keys on each."""

    rollups: list[Range]
    ledger: list[Range]
    ledger_filters: list[ColumnElement[bool]]
    rollup_filters: list[ColumnElement[bool]]
    ledger_keys: list[Any]
    rollup_keys: list[Any]

    @property
    def source(self) -> PercentileSource:
        return "histogram" if self.rollups else "exact"


def _key(row: Sequence[Any], size: int) -> Key:
    # The rollups keep "" for "no API key": NULL, as in the ledger.
    return tuple(None if value == "" else value for value in row[:size])


async def _gather(
    session: AsyncSession, q: _Query, exact: Mapping[str, tuple[Any, float]], ttft: bool
) -> dict[Key, _Sums]:
    """Sums per key from the rollups and the ledger; histograms if any rollup is read, else the
    `exact` percentiles (name -> (ledger column, q)) of each key."""
    found: dict[Key, _Sums] = defaultdict(_Sums)
    size = len(q.ledger_keys)
    if q.rollups:
        bins = [*LATENCY_BINS, *(TTFT_BINS if ttft else ())]
        stmt = (
            select(*q.rollup_keys, *(func.sum(R[n]).label(n) for n in (*ROLLUP_COUNTERS, *bins)))
            .where(_rollups_in(q.rollups), *q.rollup_filters)
            .group_by(*q.rollup_keys)
        )
        bins_at = size + len(ROLLUP_COUNTERS)
        for row in (await session.execute(stmt)).all():
            sums = found[_key(row, size)]
            sums.add(row[size:bins_at])
            sums.add_histograms(row[bins_at : bins_at + HISTOGRAM_BINS], row[bins_at + HISTOGRAM_BINS :])
    if not q.ledger:
        return found
    in_ledger = and_(_ledger_in(q.ledger), *q.ledger_filters)
    pg_exact = [
        func.percentile_cont(quantile).within_group(column.asc()).label(name)
        for name, (column, quantile) in exact.items()
        if _is_postgres(session) and not q.rollups
    ]
    stmt = select(*q.ledger_keys, *_ledger_sums(), *pg_exact).where(in_ledger).group_by(*q.ledger_keys)
    exact_at = size + len(ROLLUP_COUNTERS)
    for row in (await session.execute(stmt)).all():
        sums = found[_key(row, size)]
        sums.add(row[size:exact_at])
        sums.exact = dict(zip(exact, row[exact_at:], strict=False)) if pg_exact else {}
    if q.rollups:
        # The ledger's part goes into the histograms.
        columns = [U.latency_ms, *([U.ttft_ms] if ttft else [])]
        for values in (await session.execute(select(*q.ledger_keys, *columns).where(in_ledger))).all():
            sums = found[_key(values, size)]
            sums.latency[histogram_bin(values[size])] += 1
            if ttft and values[size + 1] is not None:
                sums.ttft[histogram_bin(values[size + 1])] += 1
    elif exact and not pg_exact:
        # SQLite: percentile_cont's formula over each key's sorted values.
        by_column: dict[Any, list[str]] = defaultdict(list)
        for name, (column, _) in exact.items():
            by_column[column].append(name)
        for column, names in by_column.items():
            sorted_values: dict[Key, list[float]] = defaultdict(list)
            stmt = select(*q.ledger_keys, column).where(in_ledger, column.is_not(None)).order_by(column)
            for ordered in (await session.execute(stmt)).all():
                sorted_values[_key(ordered, size)].append(ordered[size])
            for key, sums in found.items():
                sums.exact |= {name: percentile(sorted_values[key], exact[name][1]) for name in names}
    return found


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

    ledger_filters = _scope(principal, query.user_ids, U.user_id)
    rollup_filters = _scope(principal, query.user_ids, R.user_id)
    for name, column, rollup_column in (
        ("models", U.model, R.model),
        ("api_key_ids", U.api_key_id, R.api_key_id),
    ):
        if values := _csv(getattr(query, name)):
            ledger_filters.append(column.in_(values))
            rollup_filters.append(rollup_column.in_(values))
    chat_ids = _csv(query.chat_ids)
    if chat_ids:
        ledger_filters.append(U.chat_id.in_(chat_ids))
    rollups: list[Range] = []
    ledger: list[Range] = [(0, page_start, page_end)]
    if not chat_ids and "chat_id" not in groups:  # the rollups have no chats
        rollups, ledger = split_range(page_start, page_end, width)
    q = _Query(
        rollups,
        ledger,
        ledger_filters,
        rollup_filters,
        [((_epoch(session) - page_start) // width).label("bucket"), *(GROUP_COLUMNS[g].label(g) for g in groups)],
        [((R.period_start - page_start) // width).label("bucket"), *(ROLLUP_GROUP_COLUMNS[g].label(g) for g in groups)]
        if rollups
        else [],
    )
    exact = {f"p{round(quantile * 100)}": (U.latency_ms, quantile) for quantile in USAGE_QS}
    found = await _gather(session, q, exact, ttft=False)

    by_bucket: dict[int, list[UsageResult]] = defaultdict(list)
    for key in sorted(found, key=_sort_key):
        sums = found[key]
        if q.rollups:
            p50, p95 = (histogram_percentile(sums.latency, quantile) for quantile in USAGE_QS)
        else:
            p50, p95 = sums.exact.get("p50"), sums.exact.get("p95")
        by_bucket[int(key[0])].append(
            UsageResult(
                requests=sums.requests,
                errors=sums.errors,
                input_tokens=sums.input_tokens,
                output_tokens=sums.output_tokens,
                input_cached_tokens=sums.cached_tokens,
                reasoning_tokens=sums.reasoning_tokens,
                estimated_requests=sums.estimated,
                cost_usd=_money(sums.cost_usd),
                unpriced_requests=sums.unpriced,
                latency_ms_p50=_ms(p50),
                latency_ms_p95=_ms(p95),
                **dict(zip(groups, key[1:], strict=True)),
            )
        )
    buckets = [
        UsageBucket(start_time=s, end_time=min(s + width, end), results=by_bucket.get((s - page_start) // width, []))
        for s in range(page_start, page_end, width)
    ]
    has_more = page_end < end
    return UsagePage(
        data=buckets,
        has_more=has_more,
        next_page=str(page_end) if has_more else None,
        latency_percentiles=q.source,
    )


async def summary(session: AsyncSession, principal: Principal, query: SummaryQuery) -> UsageSummary:
    """Totals, error rate, latency and time-to-first-token percentiles, top models, unpriced tokens."""
    start, end = _window(query.start_time, query.end_time)
    rollups, ledger = split_range(start, end, end - start)
    q = _Query(
        rollups,
        ledger,
        _scope(principal, query.user_ids, U.user_id),
        _scope(principal, query.user_ids, R.user_id),
        [U.model.label("model")],
        [R.model.label("model")],
    )
    by_model = await _gather(session, q, {}, ttft=True)
    total = _Sums()
    for sums in by_model.values():
        total.merge(sums)
    if rollups:
        latency = _percentiles(lambda quantile: histogram_percentile(total.latency, quantile))
        ttft = _percentiles(lambda quantile: histogram_percentile(total.ttft, quantile))
    elif _is_postgres(session):
        where = and_(_ledger_in(ledger), *q.ledger_filters)
        stmt = select(
            *(
                func.percentile_cont(quantile).within_group(column.asc()).label(f"{column.key}_{quantile}")
                for column in (U.latency_ms, U.ttft_ms)
                for quantile in SUMMARY_QS
            )
        ).where(where)
        row = (await session.execute(stmt)).mappings().one()
        latency = _percentiles(lambda quantile: row[f"latency_ms_{quantile}"])
        ttft = _percentiles(lambda quantile: row[f"ttft_ms_{quantile}"])
    else:
        where = and_(_ledger_in(ledger), *q.ledger_filters)
        lat = list((await session.scalars(select(U.latency_ms).where(where).order_by(U.latency_ms))).all())
        stmt = select(U.ttft_ms).where(where, U.ttft_ms.is_not(None)).order_by(U.ttft_ms)
        first = [t for t in (await session.scalars(stmt)).all() if t is not None]
        latency = _percentiles(lambda quantile: percentile(lat, quantile))
        ttft = _percentiles(lambda quantile: percentile(first, quantile))

    top = sorted(by_model.items(), key=lambda item: (-item[1].requests, item[0][0]))[:10]
    return UsageSummary(
        start_time=start,
        end_time=end,
        requests=total.requests,
        errors=total.errors,
        error_rate=round(total.errors / total.requests, 6) if total.requests else 0.0,
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        input_cached_tokens=total.cached_tokens,
        reasoning_tokens=total.reasoning_tokens,
        estimated_requests=total.estimated,
        cost_usd=_money(total.cost_usd),
        latency_ms=latency,
        time_to_first_token_ms=ttft,
        latency_percentiles=q.source,
        top_models=[
            ModelTotals(
                model=model,
                requests=s.requests,
                input_tokens=s.input_tokens,
                output_tokens=s.output_tokens,
                cost_usd=_money(s.cost_usd),
            )
            for (model,), s in top
        ],
        unpriced=[
            UnpricedTokens(model=model, input_tokens=s.unpriced_input_tokens, output_tokens=s.unpriced_output_tokens)
            for (model,), s in sorted(by_model.items(), key=lambda item: item[0])
            if s.unpriced_input_tokens + s.unpriced_output_tokens > 0
        ],
    )


def _percentiles(of: Callable[[float], float | None]) -> Percentiles:
    return Percentiles(**{f"p{round(quantile * 100)}": _ms(of(quantile)) for quantile in SUMMARY_QS})


def _sort_key(key: Key) -> tuple[Any, ...]:
    # Groups in code-point order, NULL last (PostgreSQL's order for ORDER BY ... ASC).
    return (key[0], *((value is None, value or "") for value in key[1:]))


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _money(value: Decimal | float | int | None) -> float:
    return round(float(value or 0), 10)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
