"""Benchmark of history reads and search on PostgreSQL, at two sizes a hundredfold apart.

Data sets, each in its own database (never the test database), built by the
migrations and seeded with COPY:
- large (`openai_service_bench`): 1,000,000 messages in 10,000 chats of 100 users;
  one chat holds 100,000 messages, the others about 90 each;
- small (`openai_service_bench_small`): 10,000 messages in 100 chats of 1 user;
  one chat holds 1,000 messages.
Message text is 8 to 40 words drawn from a 20,000-word vocabulary with a Zipf
distribution (as word frequencies in real text), so common words are very common.

Measured through the service functions a request runs (`history.read_messages`,
`search.search_history`), each run in a fresh session, p50/p95 over `--runs`,
the runs on the two data sets interleaved so that other load on the machine
weighs on both alike (after waiting up to `--wait-quiet` seconds for quiet):
- page: 50 messages after a cursor at a random position in the middle 20% of the
  longest chat (100,000 messages large, 1,000 small);
- search: a two-word query of moderately common words, as a typical user
  (10,000 messages large and small) and as the user with the longest chat
  (109,000 messages large, 10,000 small); and a one-word query of a very common
  word (about half of all messages contain it) as a typical user.

    .venv/bin/python bench/history.py                 # seeds if needed (~3 min), then measures
    .venv/bin/python bench/history.py --reseed --runs 500

Prints a markdown table and writes it to bench/results/history.md.
"""

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.core.config import load_settings
from app.core.security import Principal
from app.db.database import SessionFactory, create_engine, create_session_factory
from app.db.migrations import upgrade_to_head
from app.schemas.history import HistoryParams, SearchParams
from app.services import history, search

ROOT = Path(__file__).resolve().parent.parent
PAGE = 50
VOCABULARY = 20_000
ZIPF_EXPONENT = 1.07
SEED = 20261203


@dataclass(frozen=True, slots=True)
class DataSet:
    name: str
    database: str
    users: int
    chats: int
    messages: int
    longest_chat: int


LARGE = DataSet("large", "openai_service_bench", users=100, chats=10_000, messages=1_000_000, longest_chat=100_000)
SMALL = DataSet("small", "openai_service_bench_small", users=1, chats=100, messages=10_000, longest_chat=1_000)


def vocabulary(rng: random.Random) -> list[str]:
    """Distinct pronounceable words, most frequent first."""
    syllables = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        words["".join(rng.choices(syllables, k=rng.choice((2, 2, 3, 3, 4))))] = None
    return list(words)


@dataclass(frozen=True, slots=True)
class Texts:
    words: list[str]
    cumulative: list[float]
    rng: random.Random

    @classmethod
    def create(cls) -> "Texts":
        rng = random.Random(SEED)
        words = vocabulary(rng)
        total, cumulative = 0.0, []
        for rank in range(1, len(words) + 1):
            total += 1 / rank**ZIPF_EXPONENT
            cumulative.append(total)
        return cls(words, cumulative, rng)

    def sentence(self, low: int = 8, high: int = 40) -> str:
        return " ".join(self.rng.choices(self.words, cum_weights=self.cumulative, k=self.rng.randint(low, high)))


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def database_url(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


def chat_sizes(data: DataSet) -> list[int]:
    """Messages per chat: the longest first, the rest shared out evenly."""
    rest, extra = divmod(data.messages - data.longest_chat, data.chats - 1)
    return [data.longest_chat] + [rest + (1 if i < extra else 0) for i in range(data.chats - 1)]


def message_rows(data: DataSet, texts: Texts, chats: list[tuple[str, str, int]]) -> Iterator[tuple[Any, ...]]:
    """(id, chat_id, user_id, seq, parent_id, role, content, status, created_at) for every message."""
    start = datetime.now(UTC) - timedelta(days=365)
    for n, (chat_id, user_id, size) in enumerate(chats):
        parent = None
        at = start + timedelta(minutes=n)
        step = timedelta(days=300) / max(size, 1)
        for seq in range(1, size + 1):
            message_id = f"msg_{secrets.token_hex(12)}"
            role = "user" if seq % 2 else "assistant"
            yield (message_id, chat_id, user_id, seq, parent, role, texts.sentence(), "complete", at + step * seq)
            parent = message_id


async def seeded(dsn: str, data: DataSet) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        count = await conn.fetchval("SELECT count(*) FROM messages")
        return bool(count == data.messages)
    finally:
        await conn.close()


async def recreate_database(admin_dsn: str, database: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def database_exists(admin_dsn: str, database: str) -> bool:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database))
    finally:
        await conn.close()


async def seed(dsn: str, data: DataSet) -> None:
    """Fill the (migrated, empty) database with COPY; secondary indexes are built once, after the load."""
    texts = Texts.create()
    now = datetime.now(UTC)
    users = [(f"usr_{secrets.token_hex(12)}", f"user {i}", "user", now) for i in range(data.users)]
    sizes = chat_sizes(data)
    chats = [(f"chat_{secrets.token_hex(12)}", users[i % data.users][0], size) for i, size in enumerate(sizes)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET maintenance_work_mem = '512MB'")
        # Foreign keys are not checked row by row during the load (the data is consistent by construction).
        await conn.execute("SET session_replication_role = replica")
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'messages'"
            " AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        )
        for index in indexes:
            await conn.execute(f'DROP INDEX "{index["indexname"]}"')
        await conn.copy_records_to_table("users", records=users, columns=["id", "name", "role", "created_at"])
        chat_records = [
            (
                chat_id,
                user_id,
                f"Chat about {texts.sentence(2, 4)}",
                "{}",
                "{}",
                "{}",
                "[]",
                False,
                False,
                size + 1,
                size,
                now,
                now,
            )
            for chat_id, user_id, size in chats
        ]
        await conn.copy_records_to_table(
            "chats",
            records=chat_records,
            columns=[
                "id",
                "user_id",
                "title",
                "params",
                "context",
                "metadata",
                "tags",
                "archived",
                "pinned",
                "next_seq",
                "message_count",
                "created_at",
                "updated_at",
            ],
        )
        columns = ["id", "chat_id", "user_id", "seq", "parent_id", "role", "content", "status", "created_at"]
        rows = message_rows(data, texts, chats)
        loaded = 0
        while batch := [row for _, row in zip(range(100_000), rows, strict=False)]:
            await conn.copy_records_to_table("messages", records=batch, columns=columns)
            loaded += len(batch)
            print(f"  {data.name}: {loaded:,} messages loaded", file=sys.stderr)
        for index in indexes:
            print(f"  {data.name}: building {index['indexname']}", file=sys.stderr)
            await conn.execute(index["indexdef"])
        await conn.execute("SET session_replication_role = origin")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class Subjects:
    """Who searches and reads what, in one data set."""

    typical: Principal
    heaviest: Principal
    longest_chat: str
    cursors: list[str]
    two_words: str
    common_word: str
    matches: dict[str, int]


async def subjects(dsn: str, data: DataSet, runs: int) -> Subjects:
    texts = Texts.create()
    two_words, common_word = f"{texts.words[40]} {texts.words[150]}", texts.words[3]
    conn = await asyncpg.connect(dsn)
    try:
        chat_id, heaviest = await conn.fetchrow("SELECT id, user_id FROM chats ORDER BY message_count DESC LIMIT 1")
        typical = await conn.fetchval(
            "SELECT user_id FROM chats WHERE user_id <> $1 GROUP BY user_id ORDER BY user_id LIMIT 1", heaviest
        )
        typical = typical or heaviest  # the small set has one user: typical and heaviest alike
        low, high = int(data.longest_chat * 0.4), int(data.longest_chat * 0.6)
        rng = random.Random(SEED)
        wanted = [rng.randint(low, high) for _ in range(runs)]
        by_seq = dict(
            await conn.fetch(
                "SELECT seq, id FROM messages WHERE chat_id = $1 AND seq BETWEEN $2 AND $3", chat_id, low, high
            )
        )
        matches = {}
        for label, user, q in (
            ("two words, typical user", typical, two_words),
            ("two words, heaviest user", heaviest, two_words),
            ("common word, typical user", typical, common_word),
        ):
            matches[label] = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE user_id = $1"
                " AND history_search_vector @@ plainto_tsquery('history_search', $2)",
                user,
                q,
            )
    finally:
        await conn.close()

    def principal(user_id: str) -> Principal:
        return Principal(user_id, "user", "key_bench", None, None)

    return Subjects(
        principal(typical), principal(heaviest), chat_id, [by_seq[s] for s in wanted], two_words, common_word, matches
    )


Call = Callable[[Any, int], Awaitable[object]]


def operations(who: Subjects) -> dict[str, Call]:
    """What is measured, as calls on a fresh session."""

    async def page(session: Any, i: int) -> object:
        params = HistoryParams(limit=PAGE, after=who.cursors[i % len(who.cursors)])
        result = await history.read_messages(session, who.heaviest, who.longest_chat, params)
        assert len(result.data) == PAGE
        return result

    def searching(principal: Principal, q: str) -> Call:
        async def run(session: Any, i: int) -> object:
            return await search.search_history(session, principal, SearchParams(q=q, limit=20))

        return run

    return {
        f"page of {PAGE}, middle of the longest chat": page,
        "search, two words, typical user": searching(who.typical, who.two_words),
        "search, two words, heaviest user": searching(who.heaviest, who.two_words),
        "search, common word, typical user": searching(who.typical, who.common_word),
    }


async def once(factory: SessionFactory, call: Call, i: int) -> float:
    """Milliseconds for one call in its own session, as a request has."""
    started = time.perf_counter()
    async with factory() as session:
        await call(session, i)
    return (time.perf_counter() - started) * 1000


async def measure(urls: dict[str, str], who: dict[str, Subjects], runs: int) -> dict[str, dict[str, list[float]]]:
    """Each operation on both data sets, runs interleaved (so that any load on the machine hits both alike)."""
    engines = {name: create_engine(load_settings(database_url=url)) for name, url in urls.items()}
    factories = {name: create_session_factory(engine) for name, engine in engines.items()}
    calls = {name: operations(who[name]) for name in urls}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in urls}
    try:
        for operation in calls["large"]:
            for name in urls:
                for i in range(20):
                    await once(factories[name], calls[name][operation], i)
                results[name][operation] = []
            for i in range(runs):
                for name in list(urls) if i % 2 else reversed(list(urls)):
                    results[name][operation].append(await once(factories[name], calls[name][operation], i))
    finally:
        for engine in engines.values():
            await engine.dispose()
    return results


def cpu_jiffies() -> tuple[int, int]:
    """(all, idle) jiffies of the machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values), values[3] + values[4]


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Cores in use on average between two `cpu_jiffies()` samples."""
    total, idle = after[0] - before[0], after[1] - before[1]
    return (1 - idle / max(total, 1)) * (os.cpu_count() or 1)


def wait_quiet(max_wait: float, threshold: float = 0.2, seconds: int = 3) -> float:
    """Wait (at most `max_wait` s) for `seconds` straight seconds under `threshold` busy cores; returns the last."""
    deadline, quiet = time.monotonic() + max_wait, 0
    while True:
        before = cpu_jiffies()
        time.sleep(1.0)
        busy = busy_between(before, cpu_jiffies())
        quiet = quiet + 1 if busy < threshold else 0
        if quiet >= seconds or time.monotonic() > deadline:
            return busy
        if not quiet:
            print(f"  waiting for a quiet machine: {busy:.2f} cores busy", file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(small: dict[str, list[float]], large: dict[str, list[float]]) -> list[str]:
    lines = [
        "| operation | small p50 ms | small p95 ms | large p50 ms | large p95 ms | large/small p50 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, times in large.items():
        s50, s95 = percentile(small[name], 50), percentile(small[name], 95)
        l50, l95 = percentile(times, 50), percentile(times, 95)
        lines.append(f"| {name} | {s50:.2f} | {s95:.2f} | {l50:.2f} | {l95:.2f} | {l50 / s50:.2f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server (any database on it); the benchmark databases are created beside it",
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--reseed", action="store_true", help="drop and seed the benchmark databases again")
    parser.add_argument("--wait-quiet", type=float, default=300, help="seconds to wait for other processes to go quiet")
    args = parser.parse_args()

    urls: dict[str, str] = {}
    who: dict[str, Subjects] = {}
    notes: list[str] = []
    for data in (SMALL, LARGE):
        url = urls[data.name] = database_url(args.database_url, data.database)
        admin = asyncpg_dsn(args.database_url)
        fresh = args.reseed or not asyncio.run(database_exists(admin, data.database))
        if not fresh:
            upgrade_to_head(url)
            fresh = not asyncio.run(seeded(asyncpg_dsn(url), data))
        if fresh:
            started = time.perf_counter()
            asyncio.run(recreate_database(admin, data.database))
            upgrade_to_head(url)
            asyncio.run(seed(asyncpg_dsn(url), data))
            print(f"{data.name}: seeded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        who[data.name] = asyncio.run(subjects(asyncpg_dsn(url), data, args.runs))
        counts = ", ".join(f"{label}: {n:,}" for label, n in who[data.name].matches.items())
        notes.append(
            f"- {data.name}: {data.messages:,} messages, {data.chats:,} chats, {data.users} users, longest chat "
            f"{data.longest_chat:,}; matching messages: {counts}"
        )
    quiet = wait_quiet(args.wait_quiet)
    before, own_before = cpu_jiffies(), time.process_time()
    started = time.monotonic()
    measured = asyncio.run(measure(urls, who, args.runs))
    busy, own = busy_between(before, cpu_jiffies()), (time.process_time() - own_before) / (time.monotonic() - started)
    notes.append(
        f"- queries: `{who['large'].two_words}` (two words), `{who['large'].common_word}` (common word)\n"
        f"- machine ({os.cpu_count()} cores): {quiet:.2f} cores busy just before the runs; during them "
        f"{busy:.2f} cores busy on average, of which this process {own:.2f} (the rest: PostgreSQL and anything else)"
    )

    lines = [
        "# History benchmark (PostgreSQL)",
        "",
        f"{args.runs} runs per figure, each through the service function in a fresh session. "
        "Goals: page p50 < 5 ms, search p50 < 50 ms, large/small <= 2.",
        "",
        *table(measured["small"], measured["large"]),
        "",
        *notes,
        "",
    ]
    output = "\n".join(lines)
    print(output)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "history.md").write_text(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
