"""The usage ledger: one row per upstream call attempt, priced from the model catalog.

Where the numbers come from is part of each row (`source`):
- `reported`: the upstream's own usage object;
- `estimated`: counted here with the model's tokenizer, because the upstream
  did not report (a stream cut off, or a server that never sends usage);
- `none`: the attempt failed before any tokens were used (all counts 0).
"""

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import insert

from app.core.logging import get_logger
from app.core.metrics import Metrics
from app.db.database import SessionFactory
from app.db.models import UsageRecord
from app.services.catalog import ModelCatalog
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

    def __init__(self, catalog: ModelCatalog, tokenizer: Tokenizer, metrics: Metrics | None = None) -> None:
        self.catalog = catalog
        self.tokenizer = tokenizer
        self.metrics = metrics

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
                        await session.execute(insert(UsageRecord), rows)
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


async def app_ledger(request: Request) -> LedgerWriter:
    writer: LedgerWriter = request.app.state.ledger
    return writer


LedgerDep = Annotated[LedgerWriter, Depends(app_ledger)]


async def app_accounting(request: Request) -> Accounting:
    accounting: Accounting = request.app.state.accounting
    return accounting


AccountingDep = Annotated[Accounting, Depends(app_accounting)]
