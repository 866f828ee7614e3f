"""The usage ledger and the stats API: exact accounting, buckets, groups, pages, scoping."""

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx2
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.db.models import UsageRecord
from app.services.tokens import Tokenizer
from app.services.usage import record_usage
from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.sse import collect, events

T0 = 1_790_000_040  # a minute boundary plus 40 s: buckets start at start_time, not on the clock


async def _rows(database_url: str, user_id: str) -> list[UsageRecord]:
    engine = create_async_engine(database_url)
    try:
        async with async_sessionmaker(engine)() as session:
            stmt = select(UsageRecord).where(UsageRecord.user_id == user_id).order_by(UsageRecord.id)
            return list((await session.scalars(stmt)).all())
    finally:
        await engine.dispose()


def ledger(database_url: str, user_id: str) -> list[UsageRecord]:
    return asyncio.run(_rows(database_url, user_id))


async def _insert(database_url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_async_engine(database_url)
    try:
        async with async_sessionmaker(engine)() as session:
            await record_usage(session, rows)
            await session.commit()
    finally:
        await engine.dispose()


def insert(database_url: str, *rows: dict[str, Any]) -> None:
    asyncio.run(_insert(database_url, list(rows)))


def row(user_id: str, at: int, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "created_at": datetime.fromtimestamp(at, UTC),
        "user_id": user_id,
        "api_key_id": "key_a",
        "chat_id": None,
        "message_id": None,
        "endpoint": "chat.message",
        "model_requested": "gpt-4o-mini",
        "model": "gpt-4o-mini",
        "stream": False,
        "attempt": 1,
        "input_tokens": 10,
        "cached_tokens": 0,
        "output_tokens": 5,
        "reasoning_tokens": 0,
        "cost_usd": Decimal("0.000004500"),
        "latency_ms": 100.0,
        "catalog_version": None,
        "ttft_ms": None,
        "status_code": 200,
        "error_type": None,
        "upstream_request_id": None,
        "source": "reported",
    }
    return values | fields


def test_stats_equal_the_upstreams_own_counters_on_every_path(
    alice: Caller, upstream: FakeUpstream, database_url: str
) -> None:
    chat = alice.chat()
    url = f"/api/v1/chats/{chat['id']}/messages"
    assert alice.http.post(url, json={"content": "plain"}).status_code == 200
    upstream.fail_next(500, retry_after="0")
    assert alice.http.post(url, json={"content": "retried once"}).status_code == 200
    upstream.fail_next(429, times=3, retry_after="0")
    assert alice.http.post(url, json={"content": "never answered"}).status_code == 429
    upstream.cached_tokens, upstream.reasoning_tokens = 3, 5
    collect(alice.http, url, {"content": "streamed with usage", "stream": True})
    upstream.cached_tokens, upstream.reasoning_tokens = 0, 0
    upstream.omit_usage_next()
    collect(alice.http, url, {"content": "streamed without usage", "stream": True})
    upstream.cut_stream_next(after_chunks=2)
    collect(alice.http, url, {"content": "cut off in the middle", "stream": True})

    summary = alice.http.get("/api/v1/stats/summary").json()
    totals = upstream.totals
    assert summary["requests"] == len(upstream.requests) == 9
    assert summary["errors"] == 5  # the 500, three 429s, the cut stream
    assert summary["input_tokens"] == totals.prompt_tokens
    assert summary["output_tokens"] == totals.completion_tokens
    assert summary["input_cached_tokens"] == totals.cached_tokens == 3
    assert summary["reasoning_tokens"] == totals.reasoning_tokens == 5
    assert summary["estimated_requests"] == 2

    rows = ledger(database_url, alice.user_id)
    assert [(r.status_code, r.source, r.attempt, r.stream) for r in rows] == [
        (200, "reported", 1, False),
        (500, "none", 1, False),
        (200, "reported", 2, False),
        (429, "none", 1, False),
        (429, "none", 2, False),
        (429, "none", 3, False),
        (200, "reported", 1, True),
        (200, "estimated", 1, True),
        (502, "estimated", 1, True),
    ]
    assert rows[8].error_type == "upstream_stream_broken"
    assert all(r.chat_id == chat["id"] and r.api_key_id is not None for r in rows)
    assert all(r.ttft_ms is not None for r in rows if r.stream)
    assert all(r.cost_usd is not None and r.catalog_version for r in rows)
    assert {r.upstream_request_id is not None for r in rows} == {True}


def test_client_disconnect_is_counted_as_one_estimated_error(
    alice: Caller, upstream: FakeUpstream, database_url: str
) -> None:
    upstream.slow_stream(0.2)
    chat = alice.chat()
    body = {"content": " ".join(f"w{i}" for i in range(30)), "stream": True}
    with alice.http.stream("POST", f"/api/v1/chats/{chat['id']}/messages", json=body) as response:
        for kind, _ in events(response):
            if kind == "message.delta":
                break
    deadline = time.monotonic() + 10
    while not (rows := ledger(database_url, alice.user_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = rows
    assert (record.status_code, record.error_type, record.source) == (499, "client_disconnected", "estimated")
    stored = alice.http.get(f"/api/v1/history/{chat['id']}").json()["data"][-1]
    tokenizer = Tokenizer()
    assert record.output_tokens == tokenizer.count_text(stored["content"], "gpt-4o-mini").tokens
    assert record.input_tokens == upstream.totals.prompt_tokens


def test_usage_buckets_start_at_start_time_and_empty_ones_are_present(alice: Caller, database_url: str) -> None:
    insert(
        database_url,
        row(alice.user_id, T0 - 1),  # before the range
        row(alice.user_id, T0, latency_ms=10.0),
        row(alice.user_id, T0 + 59, latency_ms=20.0, input_tokens=1),
        row(alice.user_id, T0 + 60, latency_ms=30.0),  # second bucket
        row(alice.user_id, T0 + 119, status_code=500, source="none", input_tokens=0, output_tokens=0),
        row(alice.user_id, T0 + 180),  # end_time is exclusive
    )
    page = alice.http.get(
        "/api/v1/stats/usage", params={"start_time": T0, "end_time": T0 + 240, "bucket_width": "1m"}
    ).json()
    assert page["object"] == "page"
    assert (page["has_more"], page["next_page"]) == (False, None)
    assert [(b["start_time"], b["end_time"]) for b in page["data"]] == [
        (T0, T0 + 60),
        (T0 + 60, T0 + 120),
        (T0 + 120, T0 + 180),
        (T0 + 180, T0 + 240),
    ]
    first, second, third, fourth = (b["results"] for b in page["data"])
    assert third == []
    assert len(first) == 1
    assert {k: first[0][k] for k in ("requests", "errors", "input_tokens", "output_tokens")} == {
        "requests": 2,
        "errors": 0,
        "input_tokens": 11,
        "output_tokens": 10,
    }
    assert (first[0]["latency_ms_p50"], first[0]["latency_ms_p95"]) == (15.0, 19.5)
    assert first[0]["cost_usd"] == 0.000009
    assert (second[0]["requests"], second[0]["errors"]) == (2, 1)
    assert fourth[0]["requests"] == 1


def test_usage_pages_walk_the_range(alice: Caller, database_url: str) -> None:
    insert(database_url, *(row(alice.user_id, T0 + 86400 * day) for day in range(5)))
    params = {"start_time": T0, "end_time": T0 + 5 * 86400, "limit": 2}
    seen: list[int] = []
    pages = 0
    while True:
        page = alice.http.get("/api/v1/stats/usage", params=params).json()
        pages += 1
        seen += [b["results"][0]["requests"] for b in page["data"]]
        if not page["has_more"]:
            break
        params["page"] = page["next_page"]
    assert (pages, seen) == (3, [1, 1, 1, 1, 1])


def test_usage_groups_by_model_and_filters_models(alice: Caller, database_url: str) -> None:
    insert(
        database_url,
        row(alice.user_id, T0, model="gpt-4o"),
        row(alice.user_id, T0 + 1, model="gpt-4o"),
        row(alice.user_id, T0 + 2, model="gpt-4o-mini"),
    )
    base = {"start_time": T0, "end_time": T0 + 86400}
    grouped = alice.http.get("/api/v1/stats/usage", params=base | {"group_by": "model"}).json()
    assert [(r["model"], r["requests"]) for r in grouped["data"][0]["results"]] == [("gpt-4o", 2), ("gpt-4o-mini", 1)]
    filtered = alice.http.get("/api/v1/stats/usage", params=base | {"models": "gpt-4o-mini"}).json()
    assert [(r["model"], r["requests"]) for r in filtered["data"][0]["results"]] == [(None, 1)]


def test_users_see_only_their_own_usage_and_admins_everyones(
    alice: Caller, bob: Caller, admin: httpx2.Client, database_url: str
) -> None:
    insert(database_url, row(alice.user_id, T0), row(alice.user_id, T0 + 1), row(bob.user_id, T0 + 2))
    window = {"start_time": T0, "end_time": T0 + 86400}
    assert bob.http.get("/api/v1/stats/summary", params=window).json()["requests"] == 1
    assert alice.http.get("/api/v1/stats/summary", params=window).json()["requests"] == 2
    refused = bob.http.get("/api/v1/stats/usage", params=window | {"user_ids": alice.user_id})
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "permission_denied")
    everyone = admin.get("/api/v1/stats/usage", params=window | {"group_by": "user_id"}).json()
    assert sorted((r["user_id"], r["requests"]) for r in everyone["data"][0]["results"]) == sorted(
        [(alice.user_id, 2), (bob.user_id, 1)]
    )
    only_bob = admin.get("/api/v1/stats/summary", params=window | {"user_ids": bob.user_id}).json()
    assert only_bob["requests"] == 1


def test_summary_reports_percentiles_top_models_and_unpriced_tokens(alice: Caller, database_url: str) -> None:
    insert(
        database_url,
        *(row(alice.user_id, T0 + i, latency_ms=float(10 * (i + 1)), ttft_ms=float(i + 1)) for i in range(4)),
        row(alice.user_id, T0 + 10, model="my-local-model", cost_usd=None, input_tokens=7, output_tokens=3),
    )
    s = alice.http.get("/api/v1/stats/summary", params={"start_time": T0, "end_time": T0 + 60}).json()
    assert (s["requests"], s["errors"], s["error_rate"]) == (5, 0, 0.0)
    # latencies 10, 20, 30, 40 and 100 (the default of the last row), interpolated like percentile_cont
    assert s["latency_ms"] == {"p50": 30.0, "p95": 88.0, "p99": 97.6}
    assert s["time_to_first_token_ms"] == {"p50": 2.5, "p95": 3.85, "p99": 3.97}
    assert [(m["model"], m["requests"]) for m in s["top_models"]] == [("gpt-4o-mini", 4), ("my-local-model", 1)]
    assert s["unpriced"] == [{"model": "my-local-model", "input_tokens": 7, "output_tokens": 3}]
    assert s["cost_usd"] == 0.000018


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start_time": T0, "end_time": T0}, "start_time"),
        ({"bucket_width": "1w"}, "bucket_width"),
        ({"bucket_width": "1d", "limit": 32}, "limit"),
        ({"group_by": "model,color"}, "group_by"),
        ({"start_time": T0, "end_time": T0 + 600, "bucket_width": "1m", "page": "12"}, "page"),
    ],
)
def test_bad_usage_queries_are_400(alice: Caller, params: dict[str, Any], param: str) -> None:
    response = alice.http.get("/api/v1/stats/usage", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_empty_range_has_buckets_with_no_results(alice: Caller) -> None:
    page = alice.http.get("/api/v1/stats/usage", params={"start_time": T0, "end_time": T0 + 3 * 86400}).json()
    assert [b["results"] for b in page["data"]] == [[], [], []]
