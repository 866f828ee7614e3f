"""The usage ledger: one row per upstream call attempt, priced from the model catalog.

Where the numbers come from is part of each row (`source`):
- `reported`: the upstream's own usage object;
- `estimated`: counted here with the model's tokenizer, because the upstream
  did not report (a stream cut off, or a server that never sends usage);
- `none`: the attempt failed before any tokens were used (all counts 0).
"""

import asyncio
import bisect
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from sqlalchemy import Table, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.logging import get_logger
from app.core.metrics import Metrics
from app.db.database import SessionFactory
from app.db.models import (
    HISTOGRAM_BOUNDS_MS,
    LATENCY_BINS,
    ROLLUP_COUNTERS,
    ROLLUP_PERIODS,
    TTFT_BINS,
    UsageRecord,
    usage_rollups,
)
from app.services.catalog import ModelCatalog
from app.services.limits import Limiter
from app.services.openai import Attempt
from app.services.tokens import Tokenizer

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who a call is made for, and through which endpoint."""

    user_id: str
    api_key_id: str | None
    chat_id: str | None
    endpoint: str


class Accounting:
    """Turns upstream attempts into priced ledger rows."""

    def __init__(
        self,
        catalog: ModelCatalog,
        tokenizer: Tokenizer,
        metrics: Metrics | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.catalog = catalog
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.limiter = limiter

    def estimate(self, model: str, context: list[dict[str, Any]], output: str) -> dict[str, Any]:
        """Usage counted here, in OpenAI's shape, marked as an estimate."""
        prompt = self.tokenizer.count_messages(context, model).tokens
        completion = self.tokenizer.count_text(output, model).tokens if output else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "source": "estimated",
        }

    def rows(
        self,
        call: CallContext,
        *,
        model_requested: str,
        failed: list[Attempt],
        stream: bool,
        final: tuple[Attempt, str, dict[str, Any]] | None = None,
        message_id: str | None = None,
    ) -> list[UsageRecord]:
        """The ledger rows of one call: each failed attempt, then the `final` one
        (attempt, model served, usage) if the call got that far."""
        rows = [self.failed(call, model_requested, a, n, stream=stream) for n, a in enumerate(failed, 1)]
        if final is not None:
            attempt, model, usage = final
            rows.append(
                self.completed(
                    call,
                    model_requested=model_requested,
                    model=model,
                    attempt=attempt,
                    number=len(failed) + 1,
                    usage=usage,
                    stream=stream,
                    message_id=message_id,
                )
            )
        return rows

    def failed(self, call: CallContext, model: str, attempt: Attempt, number: int, *, stream: bool) -> UsageRecord:
        """A ledger row for an attempt that used no tokens."""
        return self._row(call, model, model, attempt, number, None, stream=stream, message_id=None)

    def completed(
        self,
        call: CallContext,
        *,
        model_requested: str,
        model: str,
        attempt: Attempt,
        number: int,
        usage: dict[str, Any],
        stream: bool,
        message_id: str | None,
    ) -> UsageRecord:
        """A ledger row for an attempt that produced output (whole, or cut short if `attempt` says so)."""
        return self._row(call, model_requested, model, attempt, number, usage, stream=stream, message_id=message_id)

    def _row(
        self,
        call: CallContext,
        model_requested: str,
        model: str,
        attempt: Attempt,
        number: int,
        usage: dict[str, Any] | None,
        *,
        stream: bool,
        message_id: str | None,
    ) -> UsageRecord:
        usage = usage or {}
        input_tokens = int(usage.get("prompt_tokens", 0))
        cached = int(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))
        output = int(usage.get("completion_tokens", 0))
        reasoning = int(usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0))
        source = "none" if not usage else usage.get("source", "reported")
        record = UsageRecord(
            created_at=attempt.started_at,
            user_id=call.user_id,
            api_key_id=call.api_key_id,
            chat_id=call.chat_id,
            message_id=message_id,
            endpoint=call.endpoint,
            model_requested=model_requested,
            model=model,
            stream=stream,
            attempt=number,
            input_tokens=input_tokens,
            cached_tokens=cached,
            output_tokens=output,
            reasoning_tokens=reasoning,
            cost_usd=self.catalog.price(model, input_tokens, cached, output),
            catalog_version=self.catalog.version,
            latency_ms=attempt.latency_ms,
            ttft_ms=attempt.ttft_ms,
            status_code=attempt.status_code,
            error_type=attempt.error_code,
            upstream_request_id=attempt.request_id,
            source=source,
        )
        if self.metrics is not None:
            self.metrics.observe_usage(record)
        if self.limiter is not None:
            self.limiter.note(record)
        return record


class LedgerWriter:
    """Writes ledger rows off the request path, in batches.

    Rows wait in memory for at most `interval` seconds (or until `batch` of them
    have gathered) and are inserted in one statement. A normal shutdown drains
    the queue (`aclose`); readers of the ledger call `flush` first so that this
    process's own recent rows are always counted.
    """

    def __init__(self, factory: SessionFactory, *, interval: float = 0.2, batch: int = 500) -> None:
        self._factory = factory
        self._interval = interval
        self._batch = batch
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def add(self, record: UsageRecord) -> None:
        """Queue a row; never blocks."""
        self._pending.append(ledger_values(record))
        if len(self._pending) >= self._batch:
            self._wake.set()

    async def flush(self) -> None:
        """Insert every queued row now."""
        async with self._lock:
            while self._pending:
                rows, self._pending = self._pending[: self._batch], self._pending[self._batch :]
                try:
                    async with self._factory() as session:
                        await record_usage(session, rows)
                        await session.commit()
                except Exception:
                    # Keep the rows for the next flush rather than lose them.
                    self._pending[:0] = rows
                    log.exception("ledger_flush_failed", extra={"rows": len(rows)})
                    raise

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            with contextlib.suppress(Exception):
                await self.flush()

    async def aclose(self) -> None:
        """Stop the background loop and write what is left.

        The loop is asked to stop, not cancelled: a flush cut off mid-batch would lose it.
        """
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()


_LEDGER_COLUMNS = [c for c in UsageRecord.__table__.columns if c.key != "id"]


def ledger_values(record: UsageRecord) -> dict[str, Any]:
    """A ledger row's column values, without its id (for inserting it anew)."""
    return {c.key: getattr(record, c.key) for c in _LEDGER_COLUMNS}


async def record_usage(session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ledger rows (`ledger_values`) and add them to their hourly and daily rollups.

    Both in the caller's transaction, which commits: the rollups can never disagree with the
    ledger. The upsert adds increments (`SET n = usage_rollups.n + excluded.n`), so concurrent
    writers in several processes lose none; its rows go in key order, so that two transactions
    always lock shared rollup rows in the same order and cannot deadlock on them. The rollups
    go first, the order in which `TRUNCATE usage_rollups, usage_records` (the tests' clean-up)
    locks the two tables: the other order can deadlock with it.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect
    upsert = _compiled_upsert(dialect.name, dialect.driver, dialect.paramstyle)
    parameters = [upsert.parameters(item) for item in rollup_increments(rows)]
    # Core statements on the session's connection: cheaper than the ORM's bulk insert for the
    # one-row writes of the send path. They do not autoflush: pending objects go at the commit.
    connection = await session.connection()
    await connection.exec_driver_sql(upsert.sql, parameters)
    await connection.execute(insert(cast(Table, UsageRecord.__table__)), list(rows))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ZERO_ROLLUP: dict[str, Any] = {name: 0 for name in (*ROLLUP_COUNTERS, *LATENCY_BINS, *TTFT_BINS)}
_COST_QUANTUM = Decimal("1e-10")  # the ledger's cost_usd scale: Numeric(20, 10)


def histogram_bin(value_ms: float) -> int:
    """The index of the rollup histogram bin that counts `value_ms` (see HISTOGRAM_BOUNDS_MS)."""
    return bisect.bisect_right(HISTOGRAM_BOUNDS_MS, value_ms)


def rollup_increments(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What ledger rows add to each rollup row (one per period, user, key and model), in key order."""
    found: dict[tuple[int, int, str, str, str], dict[str, Any]] = {}
    for row in rows:
        since_epoch: timedelta = row["created_at"] - _EPOCH
        input_tokens, output_tokens = row.get("input_tokens") or 0, row.get("output_tokens") or 0
        cost = row.get("cost_usd")
        if cost is not None:
            # Rounded as the ledger column stores it, so that the sums agree to the last digit.
            cost = Decimal(str(cost)).quantize(_COST_QUANTUM, rounding=ROUND_HALF_UP)
        ttft = row.get("ttft_ms")
        for period in ROLLUP_PERIODS:
            start = since_epoch // timedelta(seconds=period) * period
            key = (period, start, row["user_id"], row.get("api_key_id") or "", row["model"])
            item = found.get(key)
            if item is None:
                item = found[key] = _ZERO_ROLLUP | dict(
                    zip(("period", "period_start", "user_id", "api_key_id", "model"), key, strict=True)
                )
            item["requests"] += 1
            item["errors"] += row["status_code"] >= 400
            item["input_tokens"] += input_tokens
            item["output_tokens"] += output_tokens
            item["cached_tokens"] += row.get("cached_tokens") or 0
            item["reasoning_tokens"] += row.get("reasoning_tokens") or 0
            item["estimated"] += row["source"] == "estimated"
            if cost is None:
                item["unpriced"] += 1
                item["unpriced_input_tokens"] += input_tokens
                item["unpriced_output_tokens"] += output_tokens
            else:
                item["cost_usd"] += cost
            item[LATENCY_BINS[histogram_bin(row["latency_ms"])]] += 1
            if ttft is not None:
                item[TTFT_BINS[histogram_bin(ttft)]] += 1
    return [found[key] for key in sorted(found)]


@dataclass(frozen=True, slots=True)
class _CompiledUpsert:
    """The rollups' upsert as one driver's SQL text, and how to turn an increment into its parameters."""

    sql: str
    names: tuple[str, ...]  # the parameters, in order
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, bind processor) where one is needed

    def parameters(self, increment: Mapping[str, Any]) -> tuple[Any, ...]:
        values = [increment[name] for name in self.names]
        for position, process in self.processors:
            values[position] = process(values[position])
        return tuple(values)


@functools.cache
def _compiled_upsert(dialect_name: str, driver: str, paramstyle: str) -> _CompiledUpsert:
    """INSERT ... ON CONFLICT DO UPDATE adding each increment to the stored sums, compiled once.

    Run as SQL text with plain tuples: with its 175 columns, building the statement, its cache
    key and its parameters afresh would cost more CPU than the ledger insert itself.
    """
    dialect_class: Any = make_url(f"{dialect_name}+{driver}://").get_dialect()
    dialect = dialect_class(paramstyle=paramstyle)
    stmt = (postgresql.insert if dialect_name == "postgresql" else sqlite.insert)(usage_rollups)
    added = {name: usage_rollups.c[name] + stmt.excluded[name] for name in _ZERO_ROLLUP}
    upsert = stmt.on_conflict_do_update(index_elements=list(usage_rollups.primary_key.columns), set_=added)
    compiled = upsert.compile(dialect=dialect)
    names = tuple(compiled.positiontup or ())
    processors = []
    for position, name in enumerate(names):
        process = usage_rollups.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((position, process))
    return _CompiledUpsert(compiled.string, names, tuple(processors))


async def app_ledger(request: Request) -> LedgerWriter:
    writer: LedgerWriter = request.app.state.ledger
    return writer


LedgerDep = Annotated[LedgerWriter, Depends(app_ledger)]
