"""Per-key limits: requests and tokens per minute, and a monthly budget in USD.

A key may carry any of three limits (`rpm_limit`, `tpm_limit`, `budget_usd`; set when
the key is made or with `PATCH /api/v1/keys/{id}`). Every model call is admitted here
first, native sends and `/v1` alike; a refusal is OpenAI's 429, before the upstream is
called and before anything of the request is stored:

- requests per minute: counted when a call is admitted, in a fixed window (the UTC
  minute); over the limit -> `rate_limit_exceeded` with `retry-after` (the seconds left
  in the minute), which the official SDK honours by itself;
- tokens per minute: the input and output tokens the key's calls used in the current
  minute, noted as their ledger rows are made; once the minute's tokens reach the limit,
  calls wait for the next minute (a call in flight may overshoot: its size is unknown
  until it ends);
- budget: the key's cost in the current UTC calendar month, as the usage rollups (the
  ledger's sums) say, read at most every `BUDGET_REFRESH_SECONDS` per key, plus the cost
  this process noted since; once reached -> `insufficient_quota`, `x-should-retry: false`,
  until the month ends or an admin raises the budget.

The minute counters live in this process by default. With `REDIS_URL` they live in Redis
(`INCRBY` with an expiry), shared by every worker and instance; if Redis stops answering,
calls go on without minute limits (logged) rather than fail. The budget is read from the
database either way, so every instance sees every other's spend within the refresh interval
and the ledger writer's flush interval (spend still queued in this process's ledger writer
when the budget is re-read is missed for that interval). A key's new limits reach other
workers and instances when their key cache renews it (KEY_CACHE_SECONDS). Keys without
limits cost nothing here.
"""

import asyncio
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Protocol

import redis.asyncio as redis
from fastapi import Depends, Request
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.config import ConfigError
from app.core.errors import QuotaExceededError, RateLimitError
from app.core.logging import get_logger
from app.core.security import Principal
from app.db.database import SessionFactory
from app.db.models import UsageRecord, usage_rollups

log = get_logger(__name__)

BUDGET_REFRESH_SECONDS = 5.0
COUNTER_TTL_SECONDS = 120  # a minute's counter outlives its minute, then expires
DAY = 86400


class Counters(Protocol):
    """Integer counters that expire: in this process, or in Redis."""

    async def add(self, name: str, amount: int) -> int: ...

    async def take(self, count: str | None, read: str | None) -> tuple[int, int]:
        """Add 1 to `count` and read `read` (each if named), at once: (count's new value, read's value)."""
        ...

    async def aclose(self) -> None: ...


class MemoryCounters:
    """Counters in this process (the default: one process, or limits per process)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._sweep_at = time.monotonic() + COUNTER_TTL_SECONDS

    async def add(self, name: str, amount: int) -> int:
        now = time.monotonic()
        if now >= self._sweep_at:
            self._values = {k: v for k, v in self._values.items() if v[1] > now}
            self._sweep_at = now + COUNTER_TTL_SECONDS
        value, expires = self._values.get(name, (0, 0.0))
        value = (value if expires > now else 0) + amount
        self._values[name] = (value, now + COUNTER_TTL_SECONDS)
        return value

    async def take(self, count: str | None, read: str | None) -> tuple[int, int]:
        counted = await self.add(count, 1) if count is not None else 0
        if read is None:
            return counted, 0
        value, expires = self._values.get(read, (0, 0.0))
        return counted, value if expires > time.monotonic() else 0

    async def aclose(self) -> None:
        self._values.clear()


class RedisCounters:
    """Counters in Redis, shared by every process that uses the same REDIS_URL."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def add(self, name: str, amount: int) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incrby(name, amount)
            pipe.expire(name, COUNTER_TTL_SECONDS)
            value, _ = await pipe.execute()
        return int(value)

    async def take(self, count: str | None, read: str | None) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            if count is not None:
                pipe.incrby(count, 1)
                pipe.expire(count, COUNTER_TTL_SECONDS)
            if read is not None:
                pipe.get(read)
            answers = await pipe.execute()
        counted = int(answers[0]) if count is not None else 0
        value = answers[-1] if read is not None else None
        return counted, int(value) if value is not None else 0

    async def ping(self) -> None:
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


@dataclass(slots=True)
class _Spend:
    month: int  # the month's first second, Unix time
    read_at: float  # when the ledger's sum was read (monotonic)
    stored: Decimal  # the ledger's sum then
    noted: Decimal  # what this process noted since


class Limiter:
    """Admits calls under their key's limits and notes what each call used."""

    def __init__(self, counters: Counters, factory: SessionFactory, prefix: str = "openai_service") -> None:
        self.counters = counters
        self._factory = factory
        self._prefix = prefix
        self._spend: dict[str, _Spend] = {}
        self._unsent: defaultdict[str, int] = defaultdict(int)
        self._sender: asyncio.Task[None] | None = None
        self.clock = time.time  # Unix seconds; tests pin it inside one minute

    async def admit(self, principal: Principal, session: AsyncSession | None = None) -> None:
        """Let one call through, or raise the 429 that says which limit it met.

        The budget is read with `session` if the caller has one open: on SQLite a second
        connection would wait for the write lock that the caller's transaction holds.
        """
        if principal.rpm_limit is None and principal.tpm_limit is None and principal.budget_usd is None:
            return
        try:
            await self._admit(principal, session)
        except redis.RedisError:
            # Redis away: the minute limits cannot be counted; calls go on (budgets still hold).
            log.warning("limit_counters_unavailable", extra={"key_id": principal.key_id}, exc_info=True)

    async def _admit(self, principal: Principal, session: AsyncSession | None) -> None:
        rpm, tpm, budget = principal.rpm_limit, principal.tpm_limit, principal.budget_usd
        now = self.clock()
        minute, wait = int(now // 60), max(1, math.ceil(60 - now % 60))
        key = principal.key_id
        if budget is not None:
            spent = await self._month_spend(principal, now, session)
            if spent >= budget:
                raise QuotaExceededError(
                    f"You exceeded your current quota: key {key} has spent ${_usd(spent)} of its "
                    f"${_usd(budget)} budget this month (UTC). An admin can raise `budget_usd`.",
                    headers={"x-should-retry": "false"},
                )
        if rpm is None and tpm is None:
            return
        # One trip to the counters: count this request, read the minute's tokens.
        count_name = self._name("rpm", key, minute) if rpm is not None else None
        read_name = self._name("tpm", key, minute) if tpm is not None else None
        count, used = await self.counters.take(count_name, read_name)
        if read_name is not None:
            used += self._unsent.get(read_name, 0)
        refusal = None
        if tpm is not None and used >= tpm:
            refusal = _rate_limited("tokens", key, tpm, used, wait)
        elif rpm is not None and count > rpm:
            refusal = _rate_limited("requests", key, rpm, count - 1, wait)
        if refusal is not None:
            if count_name is not None:
                await self.counters.add(count_name, -1)  # a refused call is not a request made
            raise refusal

    def note(self, record: UsageRecord) -> None:
        """Count a ledger row against its key's minute and month (called as the row is made)."""
        key = record.api_key_id
        if key is None:
            return
        now = self.clock()
        tokens = (record.input_tokens or 0) + (record.output_tokens or 0)
        if tokens:
            self._unsent[self._name("tpm", key, int(now // 60))] += tokens
            if self._sender is None or self._sender.done():
                self._sender = asyncio.get_running_loop().create_task(self._send())
        spend = self._spend.get(key)
        if spend is not None and record.cost_usd is not None and _month_start(now) == spend.month:
            spend.noted += Decimal(str(record.cost_usd))

    async def _send(self) -> None:
        """Hand the noted token counts to the counters (a task, so that `note` never waits)."""
        while self._unsent:
            name, amount = next(iter(self._unsent.items()))
            try:
                await self.counters.add(name, amount)
            except redis.RedisError:  # Redis away: limits loosen, calls go on
                log.warning("limit_counter_failed", extra={"counter": name}, exc_info=True)
            # Only now: until the counter has them, `admit` counts them here.
            if (left := self._unsent[name] - amount) > 0:
                self._unsent[name] = left
            else:
                del self._unsent[name]

    async def _month_spend(self, principal: Principal, now: float, session: AsyncSession | None) -> Decimal:
        month = _month_start(now)
        spend = self._spend.get(principal.key_id)
        if spend is None or spend.month != month or time.monotonic() - spend.read_at > BUDGET_REFRESH_SECONDS:
            read_at = time.monotonic()
            query = select(func.coalesce(func.sum(usage_rollups.c.cost_usd), 0)).where(
                usage_rollups.c.period == DAY,
                usage_rollups.c.period_start >= month,
                usage_rollups.c.user_id == principal.user_id,
                usage_rollups.c.api_key_id == principal.key_id,
            )
            if session is not None:
                stored = Decimal(str((await session.execute(query)).scalar_one()))
            else:
                async with self._factory() as own:
                    stored = Decimal(str((await own.execute(query)).scalar_one()))
            spend = self._spend[principal.key_id] = _Spend(month, read_at, stored, Decimal(0))
        return spend.stored + spend.noted

    def forget(self, key_id: str) -> None:
        """Read the key's spend afresh at its next call (its budget changed)."""
        self._spend.pop(key_id, None)

    def _name(self, kind: str, key_id: str, minute: int) -> str:
        return f"{self._prefix}:{kind}:{key_id}:{minute}"

    async def aclose(self) -> None:
        if self._sender is not None:
            await self._sender
        await self.counters.aclose()


def _rate_limited(what: str, key_id: str, limit: int, used: int, wait: int) -> RateLimitError:
    return RateLimitError(
        f"Rate limit reached for {what} per minute on key {key_id}: Limit {limit}, Used {used}. "
        f"Please try again in {wait}s.",
        headers={
            "retry-after": str(wait),
            f"x-ratelimit-limit-{what}": str(limit),
            f"x-ratelimit-remaining-{what}": str(max(limit - used, 0)),
            f"x-ratelimit-reset-{what}": f"{wait}s",
        },
    )


def _usd(amount: Decimal) -> str:
    """Dollars as plain digits, no trailing zeros: 0.000001, 25, 0.0000181."""
    return f"{amount.normalize():f}"


def _month_start(now: float) -> int:
    """The first second of the UTC calendar month holding `now` (Unix seconds)."""
    start = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(start.timestamp())


async def app_limiter(request: Request) -> Limiter:
    limiter: Limiter = request.app.state.limiter
    return limiter


LimiterDep = Annotated[Limiter, Depends(app_limiter)]


async def open_limiter(redis_url: str | None, factory: SessionFactory) -> Limiter:
    """The app's limiter: counters in Redis if REDIS_URL is set (checked now), else in memory."""
    if redis_url is None:
        return Limiter(MemoryCounters(), factory)
    counters = RedisCounters(redis_url)
    try:
        await counters.ping()
    except (redis.RedisError, OSError) as exc:
        await counters.aclose()
        raise ConfigError(f"REDIS_URL: Redis does not answer ({exc}); unset it to count limits in memory") from exc
    return Limiter(counters, factory)
