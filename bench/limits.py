"""What per-key limits cost a call: `Limiter.admit()` plus `Limiter.note()` (app/services/limits.py).

Four kinds of key, timed in the same run, interleaved in blocks of 100 calls:

- no limits (the baseline: what every key without limits pays);
- rpm + tpm + budget with the counters in this process (the default);
- the same with the counters in Redis (`REDIS_URL`): two round trips on loopback per call
  (the admission's pipeline, and the noted tokens sent by a task);
- budget only, read from PostgreSQL's usage rollups at most every 5 s (amortised).

The limits are set far above what the run uses, so no call is refused: this measures the
bookkeeping, not a refusal. Each call notes one ledger row of 1,000 tokens, as a finished
call would. Needs PostgreSQL (a scratch database `openai_service_bench_limits`, made
afresh each run) and Redis.

    .venv/bin/python bench/limits.py [--calls 20000] [--redis redis://127.0.0.1:6379/0]
"""

import argparse
import asyncio
import gc
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import common
from common import Database, Timing, fmt, table

from app.core.config import load_settings
from app.core.security import Principal
from app.db.database import create_engine, create_session_factory
from app.db.models import UsageRecord
from app.services.limits import Limiter, MemoryCounters, RedisCounters

BIG = 10**9


def row(key_id: str) -> UsageRecord:
    return UsageRecord(
        created_at=datetime.now(UTC),
        user_id="usr_bench",
        api_key_id=key_id,
        endpoint="v1.chat.completions",
        model_requested="gpt-4o-mini",
        model="gpt-4o-mini",
        stream=False,
        attempt=1,
        input_tokens=900,
        cached_tokens=0,
        output_tokens=100,
        reasoning_tokens=0,
        cost_usd=Decimal("0.000195"),
        latency_ms=10.0,
        status_code=200,
        source="reported",
    )


async def run(args: argparse.Namespace, db: Database) -> str:
    engine = create_engine(load_settings(database_url=db.url))
    factory = create_session_factory(engine)
    prefix = f"bench_{secrets.token_hex(4)}"
    memory = Limiter(MemoryCounters(), factory)
    redis = Limiter(RedisCounters(args.redis), factory, prefix=prefix)
    free = Principal("usr_bench", "user", "key_free", None, None)
    limited = Principal("usr_bench", "user", "key_limited", None, None, BIG, BIG, Decimal(BIG))
    budget_only = Principal("usr_bench", "user", "key_budget", None, None, None, None, Decimal(BIG))
    record, budget_record = row("key_limited"), row("key_budget")

    async def call(limiter: Limiter, principal: Principal, noted: UsageRecord | None) -> None:
        await limiter.admit(principal)
        if noted is not None:
            limiter.note(noted)

    kinds: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("no limits (baseline)", lambda: call(memory, free, None)),
        ("rpm + tpm + budget, counters in memory", lambda: call(memory, limited, record)),
        ("rpm + tpm + budget, counters in Redis", lambda: call(redis, limited, record)),
        ("budget only (PostgreSQL, re-read every 5 s)", lambda: call(memory, budget_only, budget_record)),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in kinds}
    for _, make in kinds:  # warm up: connections, the first budget reads
        for _ in range(200):
            await make()
    gc.collect()
    blocks = args.calls // 100
    for _ in range(blocks):
        for name, make in kinds:
            for _ in range(100):
                started = time.perf_counter()
                await make()
                samples[name].append((time.perf_counter() - started) * 1e6)
    # The floor for the Redis kind: one round trip through the same client library.
    client = RedisCounters(args.redis)
    pings = []
    for _ in range(2_000):
        started = time.perf_counter()
        await client.ping()
        pings.append((time.perf_counter() - started) * 1e6)
    await client.aclose()
    ping = Timing.of(pings)
    await memory.aclose()
    await redis.aclose()
    await engine.dispose()

    base = Timing.of(samples[kinds[0][0]])
    rows = []
    for name, _ in kinds:
        timing = Timing.of(samples[name])
        rows.append([name, fmt(timing.p50, 1), fmt(timing.p95, 1), fmt(timing.p99, 1), fmt(timing.p50 - base.p50, 1)])
    lines = [
        "## Per-key limits benchmark",
        "",
        f"{common.machine_line(await common.server_info(db))} · Redis at {args.redis} · "
        f"{blocks * 100:,} calls per kind, interleaved in blocks of 100 · times in µs per call "
        "(`admit()`, then `note()` of one 1,000-token ledger row).",
        "",
        *table(["key", "p50", "p95", "p99", "p50 added"], rows),
        "",
        f"For scale: one PING through redis-py's asyncio client, same run: {fmt(ping.p50, 1)} µs p50 "
        f"({fmt(ping.p95, 1)} p95). The Redis kind makes two round trips per call (one pipeline in "
        "`admit`, one in the task that sends the noted tokens), so the client library, not Redis, "
        "is most of its cost.",
        "",
        "No call was refused (the limits are 10⁹). A key without limits returns at the first check. "
        "With limits in memory the minute counters are dictionary updates; in Redis, `admit` is one "
        "pipeline (INCRBY + EXPIRE for rpm, GET for tpm), and `note` hands the tokens to a task that "
        "sends them. The budget is one SQL sum over the key's daily rollups every 5 s, plus the cost "
        "noted since.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per kind of key")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    db = Database(common.DEFAULT_SERVER, "openai_service_bench_limits")
    asyncio.run(db.recreate())
    db.migrate()
    text = asyncio.run(run(args, db))
    print(text)
    print(f"written to {common.write_result('limits', text)}")


if __name__ == "__main__":
    main()
