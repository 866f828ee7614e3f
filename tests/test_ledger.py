"""The batched ledger writer: nothing queued is lost on a normal shutdown."""

import asyncio
from datetime import UTC, datetime

from sqlalchemy import delete, func, select

from app.core.config import load_settings
from app.db.database import create_engine, create_session_factory
from app.db.models import UsageRecord
from app.services.usage import LedgerWriter


def record(n: int) -> UsageRecord:
    return UsageRecord(
        created_at=datetime.now(UTC),
        user_id="usr_ledger_test",
        endpoint="v1.chat.completions",
        model_requested="gpt-4o-mini",
        model="gpt-4o-mini",
        stream=False,
        attempt=1,
        input_tokens=n,
        cached_tokens=0,
        output_tokens=1,
        reasoning_tokens=0,
        latency_ms=1.0,
        status_code=200,
        source="reported",
    )


async def _queue_and_close(database_url: str, rows: int, delay: float) -> tuple[int, int]:
    engine = create_engine(load_settings(database_url=database_url))
    try:
        factory = create_session_factory(engine)
        writer = LedgerWriter(factory, interval=0.01, batch=100)
        writer.start()
        for n in range(rows):
            writer.add(record(n))
        await asyncio.sleep(delay)  # close while batches are being written
        await writer.aclose()
        async with factory() as session:
            count = await session.scalar(select(func.count()).select_from(UsageRecord))
            total = await session.scalar(select(func.sum(UsageRecord.input_tokens)))
        return int(count or 0), int(total or 0)
    finally:
        await engine.dispose()


def test_closing_the_writer_mid_flush_loses_no_row(database_url: str) -> None:
    for delay in (0.0, 0.005, 0.02):
        count, total = asyncio.run(asyncio.wait_for(_queue_and_close(database_url, 1000, delay), 30))
        assert (count, total) == (1000, sum(range(1000)))
        asyncio.run(_delete(database_url))


async def _delete(database_url: str) -> None:
    engine = create_engine(load_settings(database_url=database_url))
    try:
        async with create_session_factory(engine)() as session:
            await session.execute(delete(UsageRecord))
            await session.commit()
    finally:
        await engine.dispose()
