"""The usage rollups: always equal to the ledger, and stats read from them equal to the ledger's."""

import asyncio
import bisect
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alembic import command
from app.core.config import load_settings
from app.db.database import create_engine, create_session_factory
from app.db.migrations import alembic_config
from app.db.models import HISTOGRAM_BOUNDS_MS, LATENCY_BINS, TTFT_BINS, UsageRecord, usage_rollups
from app.services.stats import histogram_percentile, percentile, split_range
from app.services.usage import LedgerWriter, ledger_values
from tests.conftest import Caller, _admin_sql, sdk_for
from tests.fake_upstream import FakeUpstream
from tests.sse import collect
from tests.test_stats import insert as insert_rows
from tests.test_stats import row

DAY0 = 1_790_035_200  # a UTC midnight (2026-09-22)
H = 3600
D = 86400
COUNTERS = ("requests", "errors", "input_tokens", "output_tokens", "input_cached_tokens", "reasoning_tokens")
EXACT = (*COUNTERS, "estimated_requests", "cost_usd", "unpriced_requests")


# --------------------------------------------------------------------------- an independent reference


@dataclass
class Expected:
    """The ledger's sums for one rollup row, worked out here from the rows themselves."""

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
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BINS))
    ttft: list[int] = field(default_factory=lambda: [0] * len(TTFT_BINS))


def _bin(value: float) -> int:
    """The bin that counts `value`: how many bounds are at or below it."""
    return sum(1 for bound in HISTOGRAM_BOUNDS_MS if bound <= value)


def expected_rollups(ledger: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], Expected]:
    found: dict[tuple[Any, ...], Expected] = defaultdict(Expected)
    for r in ledger:
        seconds = int((r["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() // 1)
        for period in (H, D):
            e = found[(period, seconds - seconds % period, r["user_id"], r["api_key_id"] or "", r["model"])]
            e.requests += 1
            e.errors += 1 if r["status_code"] >= 400 else 0
            e.input_tokens += r["input_tokens"]
            e.output_tokens += r["output_tokens"]
            e.cached_tokens += r["cached_tokens"]
            e.reasoning_tokens += r["reasoning_tokens"]
            e.estimated += 1 if r["source"] == "estimated" else 0
            if r["cost_usd"] is None:
                e.unpriced += 1
                e.unpriced_input_tokens += r["input_tokens"]
                e.unpriced_output_tokens += r["output_tokens"]
            else:
                e.cost_usd += Decimal(str(r["cost_usd"]))
            e.latency[_bin(r["latency_ms"])] += 1
            if r["ttft_ms"] is not None:
                e.ttft[_bin(r["ttft_ms"])] += 1
    return dict(found)


def stored_rollups(rows: Sequence[Any]) -> dict[tuple[Any, ...], Expected]:
    stored = {}
    for r in rows:
        stored[(r.period, r.period_start, r.user_id, r.api_key_id, r.model)] = Expected(
            requests=r.requests,
            errors=r.errors,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            cached_tokens=r.cached_tokens,
            reasoning_tokens=r.reasoning_tokens,
            estimated=r.estimated,
            cost_usd=Decimal(str(r.cost_usd)),
            unpriced=r.unpriced,
            unpriced_input_tokens=r.unpriced_input_tokens,
            unpriced_output_tokens=r.unpriced_output_tokens,
            latency=[getattr(r, name) for name in LATENCY_BINS],
            ttft=[getattr(r, name) for name in TTFT_BINS],
        )
    return stored


async def _tables(url: str) -> tuple[list[dict[str, Any]], list[Any]]:
    engine = create_async_engine(url)
    try:
        async with async_sessionmaker(engine)() as session:
            records = (await session.scalars(select(UsageRecord).order_by(UsageRecord.id))).all()
            rollups = (await session.execute(select(usage_rollups))).all()
            return [ledger_values(r) for r in records], list(rollups)
    finally:
        await engine.dispose()


def assert_rollups_match_ledger(url: str) -> int:
    """The rollup table equals the ledger's sums, row for row; the number of ledger rows."""
    ledger, rollups = asyncio.run(_tables(url))
    assert stored_rollups(rollups) == expected_rollups(ledger)
    return len(ledger)


# --------------------------------------------------------------------------- writes


def test_rollups_equal_the_ledger_after_sends_and_v1_calls(
    alice: Caller, bob: Caller, upstream: FakeUpstream, service: str, admin: httpx2.Client, database_url: str
) -> None:
    chat = alice.chat()
    url = f"/api/v1/chats/{chat['id']}/messages"
    assert alice.http.post(url, json={"content": "plain"}).status_code == 200  # the reply transaction
    upstream.fail_next(500, retry_after="0")
    assert alice.http.post(url, json={"content": "retried"}).status_code == 200
    upstream.cached_tokens, upstream.reasoning_tokens = 3, 5
    collect(alice.http, url, {"content": "streamed", "stream": True})
    upstream.cached_tokens, upstream.reasoning_tokens = 0, 0
    with sdk_for(service, bob.key) as sdk:  # /v1 calls: the batched writer
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "via /v1"}])
        upstream.fail_next(429, times=3, retry_after="0")
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "refused"}])

    summary = admin.get("/api/v1/stats/summary").json()  # reading the stats flushes the writer
    assert summary["requests"] == len(upstream.requests) == 8
    assert assert_rollups_match_ledger(database_url) == 8


async def _flush_concurrently(url: str, writers: int, rows: int) -> None:
    engines = [create_engine(load_settings(database_url=url)) for _ in range(writers)]
    try:
        ledgers = [LedgerWriter(create_session_factory(e), batch=25) for e in engines]
        at = datetime.fromtimestamp(DAY0 + 5 * H + 17, UTC)
        for n, ledger in enumerate(ledgers):
            for i in range(rows):
                fields = row("usr_concurrent", DAY0, input_tokens=n * rows + i, latency_ms=float(i + 1))
                ledger.add(UsageRecord(**(fields | {"created_at": at})))
        await asyncio.gather(*(ledger.flush() for ledger in ledgers))
    finally:
        for engine in engines:
            await engine.dispose()


def test_concurrent_flushes_to_the_same_rollup_rows_lose_nothing(database_url: str) -> None:
    writers, rows = 6, 100
    asyncio.run(_flush_concurrently(database_url, writers, rows))
    ledger, rollups = asyncio.run(_tables(database_url))
    by_period = {r.period: r for r in rollups}
    assert len(rollups) == 2
    assert by_period[H].requests == by_period[D].requests == writers * rows
    assert by_period[H].input_tokens == sum(range(writers * rows))
    assert by_period[D].cost_usd == Decimal("0.000004500") * writers * rows
    assert sum(getattr(by_period[H], name) for name in LATENCY_BINS) == writers * rows
    assert stored_rollups(rollups) == expected_rollups(ledger)


def test_a_reply_for_a_deleted_chat_still_counts_in_ledger_and_rollups(
    alice: Caller, upstream: FakeUpstream, database_url: str
) -> None:
    upstream.slow_stream(0.2)
    chat = alice.chat()
    with alice.http.stream(
        "POST", f"/api/v1/chats/{chat['id']}/messages", json={"content": "one two three four", "stream": True}
    ) as response:
        assert alice.http.delete(f"/api/v1/chats/{chat['id']}").status_code == 200
        response.read()
    assert alice.http.get("/api/v1/stats/summary").json()["requests"] == 1
    assert assert_rollups_match_ledger(database_url) == 1


# --------------------------------------------------------------------------- reads


def _spread(user_a: str, user_b: str) -> list[dict[str, Any]]:
    """Rows over three days, on and around hour and day boundaries, of every kind stats tells apart."""
    rows = []
    offsets = [0, 1, H - 1, H, H + 0.5, 5 * H + 30, D - 1, D, D + 0.25, D + 7 * H, 2 * D - 60, 2 * D + 3 * H, 3 * D - 1]
    for n, offset in enumerate(offsets):
        for k in range(3):
            at = DAY0 + offset + k * 601
            rows.append(
                row(
                    (user_a, user_b)[k % 2],
                    int(at),
                    created_at=datetime.fromtimestamp(DAY0, UTC) + timedelta(seconds=offset + k * 601),
                    model=("gpt-4o", "gpt-4o-mini", "local")[(n + k) % 3],
                    api_key_id=None if k == 2 else f"key_{k}",
                    input_tokens=100 + n * 10 + k,
                    cached_tokens=n,
                    output_tokens=7 * n + k,
                    reasoning_tokens=k,
                    cost_usd=None if (n + k) % 3 == 2 else Decimal("0.0000001234") * (n + 1) * (k + 1),
                    latency_ms=(0.5, 1.2, 250.0, 1e6)[(n + k) % 4] + n,
                    ttft_ms=None if k == 0 else 40.0 + n * k,
                    status_code=(200, 200, 429, 502)[(n * k) % 4],
                    source=("reported", "estimated", "none")[(n + 2 * k) % 3],
                    chat_id=f"chat_{k}",
                )
            )
    return rows


def reference(rows: Sequence[dict[str, Any]], start: int, end: int, width: int, groups: Sequence[str]) -> list[Any]:
    """Buckets of (group values, exact counters, exact latency p50/p95) worked out from the rows."""
    buckets: list[dict[tuple[Any, ...], list[dict[str, Any]]]] = [defaultdict(list) for _ in range(start, end, width)]
    for r in rows:
        at = (r["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
        if start <= at < end:
            buckets[int((at - start) // width)][tuple(r[g] for g in groups)].append(r)
    out = []
    for bucket in buckets:
        results = []
        for key in sorted(bucket, key=lambda k: tuple((v is None, v or "") for v in k)):
            members = bucket[key]
            latencies = sorted(r["latency_ms"] for r in members)
            results.append(
                {
                    **dict(zip(groups, key, strict=True)),
                    "requests": len(members),
                    "errors": sum(r["status_code"] >= 400 for r in members),
                    "input_tokens": sum(r["input_tokens"] for r in members),
                    "output_tokens": sum(r["output_tokens"] for r in members),
                    "input_cached_tokens": sum(r["cached_tokens"] for r in members),
                    "reasoning_tokens": sum(r["reasoning_tokens"] for r in members),
                    "estimated_requests": sum(r["source"] == "estimated" for r in members),
                    "cost_usd": round(float(sum(r["cost_usd"] or 0 for r in members)), 10),
                    "unpriced_requests": sum(r["cost_usd"] is None for r in members),
                    "p50": percentile(latencies, 0.5),
                    "p95": percentile(latencies, 0.95),
                    "clamped_p50": clamped_percentile(latencies, 0.5),
                    "clamped_p95": clamped_percentile(latencies, 0.95),
                }
            )
        out.append(results)
    return out


TOP = HISTOGRAM_BOUNDS_MS[-1]


def near(estimate: float | None, exact: float | None) -> bool:
    """The documented bound of a histogram estimate: at most 20% (and 1 ms) off the exact value,
    taken with every value from the last bound (about 10 minutes) up counted as that bound."""
    if exact is None or estimate is None:
        return estimate is exact
    return abs(estimate - exact) <= 0.2 * exact + 1.0005


def clamped_percentile(values: Sequence[float], q: float) -> float | None:
    return percentile(sorted(min(v, TOP) for v in values), q)


@pytest.fixture
def spread(alice: Caller, bob: Caller, database_url: str) -> list[dict[str, Any]]:
    rows = _spread(alice.user_id, bob.user_id)
    insert_rows(database_url, *rows)
    return rows


def test_split_range_reads_whole_days_and_hours_from_the_rollups_and_the_rest_from_the_ledger() -> None:
    assert split_range(DAY0, DAY0 + 3 * D, D) == ([(D, DAY0, DAY0 + 3 * D)], [])
    assert split_range(DAY0 + 90, DAY0 + D + 90, D) == (
        [(H, DAY0 + H, DAY0 + D)],
        [(0, DAY0 + 90, DAY0 + H), (0, DAY0 + D, DAY0 + D + 90)],
    )
    # 1d buckets from 10:00: each bucket's hours, none of its days.
    assert split_range(DAY0 + 10 * H, DAY0 + 2 * D + 10 * H, D) == ([(H, DAY0 + 10 * H, DAY0 + 2 * D + 10 * H)], [])
    # 1h buckets off the hour: nothing whole in any bucket.
    assert split_range(DAY0 + 5, DAY0 + 3 * H + 5, H) == ([], [(0, DAY0 + 5, DAY0 + 3 * H + 5)])
    assert split_range(DAY0, DAY0 + 600, 60) == ([], [(0, DAY0, DAY0 + 600)])
    # One bucket (the summary): days in the middle, hours around them, seconds at the ends.
    start, end = DAY0 - 2 * H - 5, DAY0 + D + H + 7
    assert split_range(start, end, end - start) == (
        [(H, DAY0 - 2 * H, DAY0), (H, DAY0 + D, DAY0 + D + H), (D, DAY0, DAY0 + D)],
        [(0, start, DAY0 - 2 * H), (0, DAY0 + D + H, end)],
    )


@pytest.mark.parametrize(
    ("start", "end", "width", "groups"),
    [
        (DAY0, DAY0 + 3 * D, "1d", ("model",)),  # whole days: the daily rollups alone
        (DAY0 + 1800, DAY0 + 3 * D - 7, "1d", ("model", "api_key_id")),  # edges from the ledger
        (DAY0 + 10 * H + 1, DAY0 + 3 * D, "1d", ("user_id",)),  # every bucket boundary off the hour
        (DAY0 + 3 * H, DAY0 + 2 * D + 5 * H, "1d", ()),  # buckets from 03:00: hours only
        (DAY0, DAY0 + 2 * D, "1h", ("model", "user_id", "api_key_id")),
        (DAY0 + 600, DAY0 + D + 600, "1h", ("model",)),  # 1h buckets off the hour: the ledger alone
    ],
)
def test_usage_from_the_rollups_equals_the_ledgers_numbers(
    admin: httpx2.Client, spread: list[dict[str, Any]], start: int, end: int, width: str, groups: tuple[str, ...]
) -> None:
    seconds = {"1h": H, "1d": D}[width]
    params: dict[str, str | int] = {"start_time": start, "end_time": end, "bucket_width": width}
    params["group_by"] = ",".join(groups)
    page = admin.get("/api/v1/stats/usage", params=params | {"limit": 48 if width == "1h" else 7}).json()
    assert page["has_more"] is False
    expected = reference(spread, start, end, seconds, groups)
    assert [[{k: r[k] for k in (*groups, *EXACT)} for r in b["results"]] for b in page["data"]] == [
        [{k: r[k] for k in (*groups, *EXACT)} for r in results] for results in expected
    ]
    whole_hours = bool(split_range(start, end, seconds)[0])
    assert page["latency_percentiles"] == ("histogram" if whole_hours else "exact")
    for bucket, results in zip(page["data"], expected, strict=True):
        for got, want in zip(bucket["results"], results, strict=True):
            if whole_hours:
                assert near(got["latency_ms_p50"], want["clamped_p50"])
                assert near(got["latency_ms_p95"], want["clamped_p95"])
            else:
                assert (got["latency_ms_p50"], got["latency_ms_p95"]) == (
                    round(want["p50"], 3),
                    round(want["p95"], 3),
                )


def test_summary_from_the_rollups_equals_the_ledgers_numbers(
    alice: Caller, admin: httpx2.Client, spread: list[dict[str, Any]]
) -> None:
    start, end = DAY0 + H + 1, DAY0 + 3 * D - 30
    s = admin.get("/api/v1/stats/summary", params={"start_time": start, "end_time": end}).json()
    [[everything]] = reference(spread, start, end, end - start, ())
    assert s["latency_percentiles"] == "histogram"
    assert {k: s[k] for k in ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")} == {
        k: everything[k] for k in ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")
    }
    assert (s["input_cached_tokens"], s["reasoning_tokens"], s["estimated_requests"]) == (
        everything["input_cached_tokens"],
        everything["reasoning_tokens"],
        everything["estimated_requests"],
    )
    in_range = [r for r in spread if start <= r["created_at"].timestamp() < end]
    by_model = reference(spread, start, end, end - start, ("model",))[0]
    assert [(m["model"], m["requests"], m["input_tokens"], m["cost_usd"]) for m in s["top_models"]] == [
        (m["model"], m["requests"], m["input_tokens"], m["cost_usd"])
        for m in sorted(by_model, key=lambda m: (-m["requests"], m["model"]))
    ]
    unpriced: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in in_range:
        if r["cost_usd"] is None:
            unpriced[r["model"]][0] += r["input_tokens"]
            unpriced[r["model"]][1] += r["output_tokens"]
    assert s["unpriced"] == [
        {"model": m, "input_tokens": i, "output_tokens": o} for m, (i, o) in sorted(unpriced.items())
    ]
    latencies = sorted(r["latency_ms"] for r in in_range)
    ttfts = sorted(r["ttft_ms"] for r in in_range if r["ttft_ms"] is not None)
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert near(s["latency_ms"][name], clamped_percentile(latencies, q))
        assert near(s["time_to_first_token_ms"][name], clamped_percentile(ttfts, q))
    mine = alice.http.get("/api/v1/stats/summary", params={"start_time": start, "end_time": end}).json()
    assert mine["requests"] == sum(1 for r in in_range if r["user_id"] == alice.user_id)


def test_minute_buckets_and_chat_grouping_read_the_ledger_exactly(
    admin: httpx2.Client, spread: list[dict[str, Any]]
) -> None:
    start, end = DAY0, DAY0 + 2 * D
    params: dict[str, str | int] = {
        "start_time": start,
        "end_time": end,
        "bucket_width": "1d",
        "group_by": "chat_id,model",
    }
    page = admin.get("/api/v1/stats/usage", params=params).json()
    expected = reference(spread, start, end, D, ("chat_id", "model"))
    assert page["latency_percentiles"] == "exact"
    assert [[{k: r[k] for k in ("chat_id", "model", *EXACT)} for r in b["results"]] for b in page["data"]] == [
        [{k: r[k] for k in ("chat_id", "model", *EXACT)} for r in results] for results in expected
    ]
    assert [[(r["latency_ms_p50"], r["latency_ms_p95"]) for r in b["results"]] for b in page["data"]] == [
        [(round(r["p50"], 3), round(r["p95"], 3)) for r in results] for results in expected
    ]
    filtered = admin.get(
        "/api/v1/stats/usage", params={"start_time": start, "end_time": end, "chat_ids": "chat_1"}
    ).json()
    assert filtered["latency_percentiles"] == "exact"
    assert [b["results"][0]["requests"] for b in filtered["data"]] == [
        sum(1 for r in spread if r["chat_id"] == "chat_1" and s <= r["created_at"].timestamp() < s + D)
        for s in (start, start + D)
    ]
    minutes = admin.get(
        "/api/v1/stats/usage", params={"start_time": DAY0, "end_time": DAY0 + H + 60, "bucket_width": "1m", "limit": 61}
    ).json()
    assert minutes["latency_percentiles"] == "exact"
    assert [b["results"][0]["requests"] if b["results"] else 0 for b in minutes["data"]] == [
        sum(1 for r in spread if s <= r["created_at"].timestamp() < s + 60) for s in range(DAY0, DAY0 + H + 60, 60)
    ]


def test_histogram_percentiles_are_within_20_percent_of_the_exact_ones() -> None:
    values = [0.25, 0.75, 1.0, 99.0, 100.0, 101.0, 2500.0, 2600.0, 9e6]
    counts = [0] * len(LATENCY_BINS)
    for value in values:
        counts[bisect.bisect_right(HISTOGRAM_BOUNDS_MS, value)] += 1
    for q in (0.0, 0.1, 0.25, 0.5, 0.8, 0.9, 0.95, 0.99):
        assert near(histogram_percentile(counts, q), clamped_percentile(values, q))
    # One value alone: the geometric middle of its bin.
    single = [0] * len(LATENCY_BINS)
    single[bisect.bisect_right(HISTOGRAM_BOUNDS_MS, 100.0)] = 1
    lower, upper = HISTOGRAM_BOUNDS_MS[25:27]
    assert (lower, upper) == (95.396, 114.475)
    assert histogram_percentile(single, 0.5) == pytest.approx((lower * upper) ** 0.5)
    assert histogram_percentile(counts, 1.0) == TOP  # the open-ended last bin reports its bound
    assert histogram_percentile([0] * len(LATENCY_BINS), 0.5) is None


# --------------------------------------------------------------------------- the migration


@pytest.fixture
def empty_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A database of its own, not yet migrated."""
    if database_url.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrate.db'}"
        return
    name = f"openai_service_migrate_{secrets.token_hex(4)}"
    asyncio.run(_admin_sql(database_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin_sql(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _run(url: str, work: Callable[[Any], Any]) -> Any:
    engine = create_async_engine(url)
    try:
        async with async_sessionmaker(engine)() as session:
            result = await work(session)
            await session.commit()
            return result
    finally:
        await engine.dispose()


def test_migration_backfills_the_rollups_from_the_ledger(empty_database: str) -> None:
    config = alembic_config(empty_database)
    command.upgrade(config, "005f83ad33e7")
    rows = _spread("usr_a", "usr_b")
    rows[0] |= {"latency_ms": 1.2, "ttft_ms": 1.0}  # exactly on a bound: the bin it opens
    rows[1] |= {"latency_ms": 602880.118, "ttft_ms": 0.0}  # the last bound, and zero

    async def insert_ledger(session: Any) -> None:
        await session.execute(insert(UsageRecord), rows)

    asyncio.run(_run(empty_database, insert_ledger))
    command.upgrade(config, "head")
    assert assert_rollups_match_ledger(empty_database) == len(rows)
    command.downgrade(config, "005f83ad33e7")
    command.upgrade(config, "head")
    assert assert_rollups_match_ledger(empty_database) == len(rows)
